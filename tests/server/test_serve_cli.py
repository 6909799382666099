"""``cxr-fl-server serve``/``submit``: bad input is a one-line error, exit 2, before anything starts."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from server.cli import app

runner = CliRunner()


def test_submit_without_a_served_federation_says_to_start_one(tmp_path: Path) -> None:
    result = runner.invoke(app, ["submit", "spring", "--run-dir", str(tmp_path / "run")])

    assert result.exit_code == 2
    assert "no `cxr-fl-server serve --run-dir" in result.output
    assert not (tmp_path / "run" / "runs").exists()


def test_a_run_name_that_is_no_folder_name_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["submit", "../escape", "--run-dir", str(tmp_path / "run")])

    assert result.exit_code == 2
    assert "NAME" in result.output


def test_serve_needs_certificates_or_insecure(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--run-dir", str(tmp_path / "run")])

    assert result.exit_code == 2
    assert "--certs DIR is required" in result.output


def test_serve_refuses_a_console_on_the_sites_port_before_anything_starts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["serve", "--run-dir", str(run_dir), "--insecure", "--port", "9555", "--console-port", "9555"]

    result = runner.invoke(app, args)

    assert result.exit_code == 2
    assert "--console-port 9555: that is the sites' port" in result.output
    assert not (run_dir / "deploy.json").exists()  # no SuperLink was started
