"""The run-settings module: schema, TOML reading, the one coercer and boolean parser, the rules."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from common.config import ModelConfig, PrivacyConfig
from common.errors import ConfigError, UnknownNameError
from common.run_settings import (
    check_run_config,
    coerce,
    from_mapping,
    load_schema,
    parse_bool,
    parse_set,
    parse_set_option,
    read_toml,
    resolve_run_config,
    run_settings_from_config,
    to_mapping,
)


def test_schema_is_pyprojects_run_config() -> None:
    schema = load_schema()
    assert schema["num-rounds"] == 3
    assert schema["kd-enabled"] is True
    assert "run-dir" in schema


def test_config_file_and_sets_are_typed_and_sets_win(tmp_path: Path) -> None:
    config = tmp_path / "fed.toml"
    config.write_text('num-rounds = 4\nteacher-name = "tiny-cnn"\nround-timeout = 30\n')

    resolved = resolve_run_config(
        load_schema(), config, ["num-rounds=2", "kd-enabled=false", "strategy=fedprox"]
    )

    assert resolved == {
        "num-rounds": 2,
        "teacher-name": "tiny-cnn",
        "round-timeout": 30.0,
        "kd-enabled": False,
        "strategy": "fedprox",
    }
    assert isinstance(resolved["round-timeout"], float)


def test_unknown_key_lists_the_valid_ones(tmp_path: Path) -> None:
    config = tmp_path / "fed.toml"
    config.write_text("num-round = 4\n")
    with pytest.raises(ConfigError, match="num-round") as info:
        resolve_run_config(load_schema(), config)
    assert "num-rounds" in str(info.value)
    assert "kd-temperature" in str(info.value)
    with pytest.raises(ConfigError, match="--set"):
        resolve_run_config(load_schema(), None, ["rounds=2"])


@pytest.mark.parametrize(
    ("item", "message"),
    [("num-rounds=two", "an integer"), ("kd-enabled=1", "true or false"), ("num-rounds", "KEY=VALUE")],
)
def test_bad_set_values(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_run_config(load_schema(), None, [item])


def test_parse_set_option_keeps_bare_words_as_strings() -> None:
    assert parse_set_option("strategy=fedadam") == ("strategy", "fedadam")
    assert parse_set_option("lr=0.05") == ("lr", 0.05)


def test_a_string_is_never_a_boolean() -> None:
    assert parse_bool("baselines", True) is True
    assert parse_bool("baselines", False) is False
    for value in ("no", "yes", "true", "1", 1, 0, None):
        with pytest.raises(ConfigError, match="baselines"):
            parse_bool("baselines", value)


def test_text_booleans_are_exactly_true_or_false() -> None:
    assert parse_bool("drop-unmapped", "true", text=True) is True
    assert parse_bool("drop-unmapped", " False ", text=True) is False
    for value in ("no", "yes", "1", "on", ""):
        with pytest.raises(ConfigError, match="drop-unmapped"):
            parse_bool("drop-unmapped", value, text=True)


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (2, int, 2),
        (2, float, 2.0),
        (0.5, float, 0.5),
        ("fedavg", str, "fedavg"),
        ("~/w.pt", Path, Path("~/w.pt").expanduser()),
        ("", Path | None, None),
        ("w.pt", Path | None, Path("w.pt")),
        ("group", Literal["batch", "group"], "group"),
    ],
)
def test_coerce_accepts_values_of_the_settings_type(value: object, kind: object, expected: object) -> None:
    assert coerce("x", value, kind) == expected


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("2", int),
        (2.5, int),
        (True, int),
        (True, float),
        ("0.1", float),
        (3, str),
        ("layer", Literal["batch"]),
    ],
)
def test_coerce_refuses_values_of_another_type(value: object, kind: object) -> None:
    with pytest.raises(ConfigError, match="'x'"):
        coerce("x", value, kind)


def test_from_mapping_reads_prefixed_kebab_keys_and_round_trips() -> None:
    config = from_mapping(PrivacyConfig, {"dp-enabled": True, "dp-target-epsilon": 3, "lr": 0.1}, "dp-")
    assert config.enabled is True
    assert config.target_epsilon == 3.0
    assert from_mapping(PrivacyConfig, to_mapping(config, "dp-"), "dp-") == config
    assert from_mapping(ModelConfig, {"weights": ""}).weights is None
    with pytest.raises(ConfigError, match="kd-temprature"):
        from_mapping(PrivacyConfig, {"kd-temprature": 2.0}, "kd-", strict=True)


def test_run_config_checks_keys_types_and_values() -> None:
    with pytest.raises(ConfigError, match="num-rounds"):
        check_run_config({"num-rounds": "three"})
    with pytest.raises(ConfigError, match="num-rounds"):
        check_run_config({"num-round": 3})
    with pytest.raises(ConfigError, match="num-rounds"):
        check_run_config({"num-rounds": 0})
    with pytest.raises(ConfigError, match="kd-enabled"):
        check_run_config({"kd-enabled": "no"})
    with pytest.raises(UnknownNameError, match="resnet18"):
        check_run_config({"teacher-name": "resnet19"})
    merged = check_run_config({"num-rounds": 5, "lr": 1})
    assert merged["num-rounds"] == 5
    assert merged["lr"] == 1.0
    assert merged["kd-temperature"] == load_schema()["kd-temperature"]


def test_dp_needs_group_norm_and_the_error_says_what_to_change() -> None:
    with pytest.raises(ConfigError, match="teacher-norm") as info:
        check_run_config({"dp-enabled": True})
    assert "group" in str(info.value)
    assert "BatchNorm" in str(info.value)
    settings = run_settings_from_config({"dp-enabled": True, "teacher-norm": "group"})
    assert settings.uses_dp


def test_schema_is_pyprojects_table_so_new_keys_just_work(tmp_path: Path) -> None:
    project = Path(__file__).resolve().parents[2]
    text = (project / "pyproject.toml").read_text(encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text(
        text.replace("[tool.flwr.app.config]\n", '[tool.flwr.app.config]\nnew-site-option = "x"\n'),
        encoding="utf-8",
    )
    assert load_schema(tmp_path)["new-site-option"] == "x"


def test_toml_files_must_be_utf8_and_valid(tmp_path: Path) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes('task = "pneumonie à droite"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.toml.*UTF-8"):
        read_toml(latin)
    broken = tmp_path / "broken.toml"
    broken.write_text("num-rounds = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="valid TOML"):
        read_toml(broken)
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        read_toml(tmp_path / "missing.toml")


def test_set_values_are_read_as_toml() -> None:
    assert parse_set(["num-rounds=5", "strategy=fedprox", 'task="nih14"', "dp-enabled=true"]) == {
        "num-rounds": 5,
        "strategy": "fedprox",
        "task": "nih14",
        "dp-enabled": True,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["num-rounds"])


@pytest.mark.parametrize("key", ["round-timeout", "distill-round-timeout"])
def test_a_timeout_that_is_not_positive_is_refused_naming_it(key: str) -> None:
    from common.run_settings import run_settings_from_config

    with pytest.raises(ConfigError, match=key):
        run_settings_from_config({key: 0})


def test_selecting_on_the_coordinator_needs_its_hold_out() -> None:
    with pytest.raises(ConfigError, match=r"select-on.*central-eval-manifest"):
        run_settings_from_config({**load_schema(), "select-on": "coordinator"})
    with pytest.raises(ConfigError, match="select-on"):
        run_settings_from_config({**load_schema(), "select-on": "server"})
    chosen = {**load_schema(), "select-on": "coordinator", "central-eval-manifest": "/data/holdout.csv"}
    assert run_settings_from_config(chosen).run.select_on == "coordinator"
