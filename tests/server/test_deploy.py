"""Run settings checked against pyproject's schema, and progress read from the run's log lines."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.errors import ConfigError
from server.deploy import load_schema, parse_progress, parse_set_option, resolve_run_config, write_run_config


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
    out = tmp_path / "overrides.toml"
    write_run_config(out, resolved)
    assert tomllib.loads(out.read_text()) == resolved


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
    [("num-rounds=two", "type int"), ("kd-enabled=1", "type bool"), ("num-rounds", "KEY=VALUE")],
)
def test_bad_set_values(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_run_config(load_schema(), None, [item])


def test_parse_set_option_keeps_bare_words_as_strings() -> None:
    assert parse_set_option("strategy=fedadam") == ("strategy", "fedadam")
    assert parse_set_option("lr=0.05") == ("lr", 0.05)


def test_progress_from_round_lines() -> None:
    line = (
        "INFO server.rounds: Round 2/5: 1/2 sites trained, train loss 1.1007, "
        "val auroc_macro 0.6164 (best round 2), 60.4 s"
    )
    progress = parse_progress(line)
    assert progress is not None
    assert (progress.completed_round, progress.num_rounds, progress.replied, progress.sampled) == (2, 5, 1, 2)
    assert progress.metric_name == "auroc_macro"
    assert progress.metric == pytest.approx(0.6164)
    resumed = parse_progress("INFO server.rounds: Resuming run in /x after round 1 of 3 (best so far: ...)")
    assert resumed is not None
    assert (resumed.completed_round, resumed.num_rounds) == (1, 3)
    distill = parse_progress("INFO server.app: Distillation round: sending the best global teacher")
    assert distill is not None
    assert distill.phase == "distill"
    assert parse_progress("INFO :      configure_train: Sampled 2 nodes (out of 2)") is None
