"""cxr-fl-server: option errors are refused before anything starts, with one line saying why."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.cli import app

runner = CliRunner()


def test_certs_and_site_key_commands(tmp_path: Path) -> None:
    made = runner.invoke(app, ["certs", "--out", str(tmp_path / "certs"), "--host", "127.0.0.1"])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "certs" / "ca.crt").is_file()
    key = runner.invoke(app, ["site-key", "--out", str(tmp_path / "keys"), "--site", "site-a"])
    assert key.exit_code == 0, key.output
    assert (tmp_path / "keys" / "site-a.pub").is_file()
    again = runner.invoke(app, ["site-key", "--out", str(tmp_path / "keys"), "--site", "site-a"])
    assert again.exit_code == 2
    assert "already exists" in again.output


def test_start_refuses_unknown_run_settings(tmp_path: Path) -> None:
    config = tmp_path / "fed.toml"
    config.write_text("num-round = 2\n")
    result = runner.invoke(
        app, ["start", "--run-dir", str(tmp_path / "run"), "--insecure", "--config", str(config)]
    )
    assert result.exit_code == 2
    assert "num-round" in result.output
    assert "num-rounds" in result.output  # the valid keys are listed
    assert not (tmp_path / "run" / "deploy.json").exists()  # nothing was started


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num-rounds = 0\n", "num-rounds"),
        ('kd-enabled = "no"\n', "kd-enabled"),
        ('dp-enabled = true\nteacher-norm = "batch"\n', "teacher-norm"),
    ],
)
def test_start_checks_every_run_setting_before_the_superlink(tmp_path: Path, text: str, message: str) -> None:
    output = _start_refused(tmp_path, text.encode("utf-8"))
    assert message in output


def test_start_config_that_is_not_utf8(tmp_path: Path) -> None:
    output = _start_refused(tmp_path, 'task = "normal-pneumonia"  # hôpital\n'.encode("latin-1"))
    assert "fed.toml" in output
    assert "UTF-8" in output


def _start_refused(tmp_path: Path, config_bytes: bytes) -> str:
    """``start --config`` with this file: exit 2, one line, and no SuperLink started."""
    config = tmp_path / "fed.toml"
    config.write_bytes(config_bytes)
    result = runner.invoke(
        app, ["start", "--run-dir", str(tmp_path / "run"), "--insecure", "--config", str(config)]
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "deploy.json").exists()
    return result.output


def test_start_needs_certs_unless_insecure(tmp_path: Path) -> None:
    result = runner.invoke(app, ["start", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "--certs" in result.output
    missing = runner.invoke(app, ["start", "--run-dir", str(tmp_path / "run"), "--certs", str(tmp_path)])
    assert missing.exit_code == 2
    assert "ca.crt" in missing.output


def test_start_resume_rules(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    nothing = runner.invoke(app, ["start", "--run-dir", str(run_dir), "--insecure", "--resume"])
    assert nothing.exit_code == 2
    assert "no earlier run" in nothing.output
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "state.json").write_text("{}")
    again = runner.invoke(app, ["start", "--run-dir", str(run_dir), "--insecure"])
    assert again.exit_code == 2
    assert "--resume" in again.output


def test_status_of_a_folder_without_deployment(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no deployment" in result.output
