"""Whatever options a site starts with, its SuperNode hands every task to the site's warm runner.

The warm runner (flower_adapter/app_runner.py) checks the app's hash against the site's allow-list
before anything runs; a SuperNode that spawned Flower's own ClientApp from the coordinator's app
bundle would skip that check. So no option of ``cxr-fl-client start`` (or ``serve``, the same
options) may choose another runtime: the SuperNode always runs ``--isolation process`` with the
runner's secret.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import typer.main
from typer.testing import CliRunner

from client.cli import app
from client.deploy import SiteNodeSettings

runner = CliRunner()
START = typer.main.get_command(app).commands["start"]  # type: ignore[attr-defined]
SERVE = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
BASE = ["--server", "127.0.0.1:9", "--site", "a", "--format", "synthetic", "--skip-check"]


def _sample_values(tmp_path: Path) -> dict[str, list[str]]:
    """The arguments that give each of ``start``'s options (bar the flags) a valid value, with
    whatever that value needs (the DP options need a budget)."""
    files = {name: tmp_path / name for name in ("ca.crt", "a.key", "teacher.pt", "policy.toml")}
    for path in files.values():
        path.write_text("")
    return {
        "--data": [str(tmp_path / "data")],
        "--ca": [str(files["ca.crt"])],
        "--key": [str(files["a.key"])],
        "--epsilon": ["3"],
        "--delta": ["1e-5", "--epsilon", "3"],
        "--max-grad-norm": ["1.0", "--epsilon", "3"],
        "--accountant": ["prv", "--epsilon", "3"],
        "--privacy-ledger": [str(tmp_path / "ledger.json")],
        "--state-dir": [str(tmp_path / "state")],
        "--operating-point": ["balanced-accuracy"],
        "--threads": ["1"],
        "--device": ["cpu"],
        "--task": ["normal-pneumonia"],
        "--image-size": ["32"],
        "--connect-timeout": ["10"],
        "--reconnect-timeout": ["10"],
        "--activate-timeout": ["10"],
        "--allow-app": ["ab" * 32],
        "--supernode-memory": ["0"],
        "--initial-teacher-sha256": ["cd" * 32],
        "--initial-teacher": [str(files["teacher.pt"])],
        "--max-image-size": ["64"],
        "--max-local-epochs": ["2"],
        "--max-kd-epochs": ["2"],
        "--max-rounds": ["3"],
        "--max-teacher-parameters": ["1000000"],
        "--phases": ["teacher"],
        "--policy": [str(files["policy.toml"])],
    }


def _option_names(command: click.Command) -> list[str]:
    return [name for param in command.params for name in param.opts if name.startswith("--")]


@pytest.mark.parametrize("command", [START, SERVE], ids=["start", "serve"])
def test_no_option_chooses_another_client_app_runtime(command: click.Command) -> None:
    names = _option_names(command)
    assert "--server" in names  # the introspection sees the options
    assert not [name for name in names if "runtime" in name or "isolation" in name]


def test_the_former_runtime_option_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["start", *BASE, "--out", str(tmp_path / "o"), "--runtime", "flower"])
    assert result.exit_code == 2
    assert "No such option" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", _option_names(START))
def test_every_start_option_keeps_the_warm_runner(
    option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[SiteNodeSettings] = []
    monkeypatch.setattr("client.cli._run_site", built.append)
    flags = {name for param in START.params if getattr(param, "is_flag", False) for name in param.opts}
    samples = _sample_values(tmp_path)
    given = [*BASE, "--out"]
    assert option in flags or option in samples or option in given, f"no sample value for {option}"
    extra = [] if option in given else [option] if option in flags else [option, *samples[option]]
    result = runner.invoke(app, ["start", *BASE, "--out", str(tmp_path / "o"), *extra])
    assert result.exit_code == 0, result.output
    [settings] = built

    secret = tmp_path / "superexec.secret"
    supernode = settings.command(1234, secret)
    assert supernode[supernode.index("--isolation") + 1] == "process"
    assert supernode[supernode.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert supernode[supernode.index("--host") + 1] == "127.0.0.1"
    bound = str(int(settings.supernode_memory_gib * 1024**3))  # the site's own bound, 0 only when it says so
    assert supernode[supernode.index("--memory-limit") + 1] == bound
