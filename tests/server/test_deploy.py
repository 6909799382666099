"""Run settings checked against pyproject's schema, and progress read from the run's log lines."""

from __future__ import annotations

import os
import sys
import time
import tomllib
from pathlib import Path

import pytest

from common.errors import ConfigError
from server.deploy import (
    FlwrRunTimeoutError,
    follow_flwr_run,
    load_schema,
    parse_progress,
    parse_set_option,
    resolve_run_config,
    write_run_config,
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
    in_train = parse_progress("INFO server.rounds: Round 3/5: 2/2 sites trained, train loss 0.9, 4.2 s")
    assert in_train is not None  # validation-mode in-train: this round's model is validated later
    assert (in_train.completed_round, in_train.replied, in_train.metric) == (3, 2, None)
    resumed = parse_progress("INFO server.rounds: Resuming run in /x after round 1 of 3 (best so far: ...)")
    assert resumed is not None
    assert (resumed.completed_round, resumed.num_rounds) == (1, 3)
    distill = parse_progress("INFO server.app: Distillation round: sending the best global teacher")
    assert distill is not None
    assert distill.phase == "distill"
    assert parse_progress("INFO :      configure_train: Sampled 2 nodes (out of 2)") is None


def _fake_flwr(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_follow_flwr_run_logs_lines_finds_the_run_id_and_keeps_the_exit_code(tmp_path: Path) -> None:
    seen: list[str] = []
    script = "print('\\x1b[32mSuccessfully started run 42\\x1b[0m'); print('round 1'); raise SystemExit(3)"

    run = follow_flwr_run(
        _fake_flwr(script),
        env=os.environ,
        cwd=tmp_path,
        log_path=tmp_path / "flower.log",
        on_line=seen.append,
    )

    assert run.returncode == 3
    assert run.run_id == 42
    assert seen == ["Successfully started run 42", "round 1"]
    assert (tmp_path / "flower.log").read_text() == "Successfully started run 42\nround 1\n"


def test_follow_flwr_run_times_out_while_flower_prints_nothing(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    started = time.monotonic()

    with pytest.raises(FlwrRunTimeoutError, match="within 2 s"):
        follow_flwr_run(
            _fake_flwr(script), env=os.environ, cwd=tmp_path, log_path=tmp_path / "log", timeout=2
        )

    assert time.monotonic() - started < 30
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the silent process was stopped
