"""Run settings checked against pyproject's schema, and `flwr run`'s log followed line by line."""

from __future__ import annotations

import os
import sys
import time
import tomllib
from pathlib import Path

import pytest

from server.deploy import (
    FlwrRunTimeoutError,
    follow_flwr_run,
    write_run_config,
)


def test_written_overrides_read_back_equal(tmp_path: Path) -> None:
    resolved = {"num-rounds": 2, "teacher-name": "tiny-cnn", "round-timeout": 30.0, "kd-enabled": False}
    out = tmp_path / "overrides.toml"
    write_run_config(out, resolved)
    assert tomllib.loads(out.read_text()) == resolved


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


def test_a_site_key_counts_as_registered_only_with_the_superlink_that_knows_it(tmp_path: Path) -> None:
    """SuperLink state lives in memory by default: a key registered before a restart must be
    registered again, while one registered since this SuperLink started (``--resume`` registers
    the known sites, then ``--site-key`` may name them again) must not be sent to Flower twice."""
    import json

    from server.deploy import Coordinator, DeployError

    coordinator = Coordinator(tmp_path / "run")
    coordinator.run_dir.mkdir()
    key = tmp_path / "site-a.pub"
    key.write_text("ecdsa-sha2-nistp384 AAAAkey site-a\n", encoding="utf-8")
    site = {
        "name": "site-a",
        "public_key": "ecdsa-sha2-nistp384 AAAAkey",
        "node_id": 42,
        "key_file": str(key),
    }
    coordinator.sites_path.write_text(json.dumps([{**site, "superlink_started": 100.0}]), encoding="utf-8")

    coordinator.state_path.write_text(json.dumps({"database": False, "started": 100.0}), encoding="utf-8")
    assert coordinator.register_site(key, "site-a") == 42  # this SuperLink knows it: no Flower call

    coordinator.state_path.write_text(json.dumps({"database": False, "started": 200.0}), encoding="utf-8")
    with pytest.raises(DeployError, match="no SuperLink"):  # a restarted one does not: register again
        coordinator.register_site(key, "site-a")

    coordinator.state_path.write_text(json.dumps({"database": True, "started": 200.0}), encoding="utf-8")
    assert coordinator.register_site(key, "site-a") == 42  # kept in its database


def test_a_new_run_folder_is_private_and_an_open_one_is_named_with_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from server.deploy import make_private_folder

    fresh = tmp_path / "runs" / "federation"
    make_private_folder(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o700

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with caplog.at_level("WARNING", logger="server.deploy"):
        make_private_folder(shared)
    assert f"chmod 700 {shared}" in caplog.text
    assert shared.stat().st_mode & 0o777 == 0o755  # the operator's folder, left as it is
