"""``python -m simulation``: bad config files and options end in one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import simulation.cli as cli
from tests.common.data.helpers import write_image

runner = CliRunner()


def _user_error(args: list[str]) -> str:
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('[[sources]]\npath = "x"\n', "sources[0].format"),
        ('sources = "x"\n', "'sources'"),
        ("partition = 5\n", "'partition'"),
        ('[partition]\nsites = "two"\n', "partition.sites"),
        ("run = 3\n", "'run'"),
        ('cpus-per-site = "many"\n', "cpus-per-site"),
        ("cpus-per-site = 0\n", "cpus-per-site"),
        ('baselines = "no"\n', "baselines"),
        ('strict = "yes"\n', "strict"),
        ("[run]\nnum-rounds = 0\n", "num-rounds"),
        ('[run]\ndp-enabled = true\nteacher-norm = "batch"\n', "teacher-norm"),
    ],
)
def test_malformed_config_tables(tmp_path: Path, text: str, names: str) -> None:
    config = tmp_path / "exp.toml"
    config.write_text(text, encoding="utf-8")
    output = _user_error(["run", "--config", str(config), "--out", str(tmp_path / "out")])
    assert names in output
    assert not (tmp_path / "out").exists()


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_bytes('task = "normal-pneumonia"  # hôpital\n'.encode("latin-1"))
    output = _user_error(["run", "--config", str(config), "--out", str(tmp_path / "out")])
    assert "exp.toml" in output
    assert "UTF-8" in output


@pytest.mark.parametrize("command", ["partition", "run"])
def test_data_without_source_is_not_silently_synthetic(tmp_path: Path, command: str) -> None:
    for i in range(3):
        write_image(tmp_path / "data" / "NORMAL" / f"n{i}.png", seed=i)
    output = _user_error([command, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert "--source" in output
    assert not (tmp_path / "out").exists()
