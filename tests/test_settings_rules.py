"""The rules between run settings are one function: every entry point refuses a run alike.

``cxr-fl-server start`` and ``python -m simulation run`` refuse the same settings with the same
one line (exit 2) before any work; the ServerApp and the ClientApp raise the same error from the
run_config Flower hands them (both build their settings with ``run_settings_from_config``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import simulation.cli as simulation_cli
from common.errors import ConfigError
from common.run_settings import check_run_config, load_schema, parse_set, run_settings_from_config
from common.site_limits import CACHE_MAX_AGE_KEY, SitePolicy
from server.cli import app as server_app

runner = CliRunner()

VIOLATIONS = {
    "central DP needs GroupNorm": ["central-dp-noise-multiplier=1.0"],
    "central DP needs FedAvg": [
        "central-dp-noise-multiplier=1.0",
        'teacher-norm="group"',
        'strategy="fedprox"',
        "proximal-mu=0.1",
    ],
    "DP-SGD needs GroupNorm": ["dp-enabled=true"],
    "a label-skew loss refuses DP": ["dp-enabled=true", 'teacher-norm="group"', 'local-loss="fedlc"'],
}


def _error_line(args: list[str], app: object) -> str:
    result = runner.invoke(app, args)  # type: ignore[arg-type]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize("items", VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_server_cli_and_simulation_refuse_a_rule_violation_alike(tmp_path: Path, items: list[str]) -> None:
    server = _error_line(
        ["start", "--run-dir", str(tmp_path / "run"), "--insecure", *_sets(items)], server_app
    )
    simulation = _error_line(["run", "--out", str(tmp_path / "out"), *_sets(items)], simulation_cli.app)
    assert server == simulation
    assert not (tmp_path / "run" / "deploy.json").exists()  # no SuperLink was started
    assert not (tmp_path / "out").exists()  # nothing was partitioned or trained
    # the ServerApp and the ClientApp build their settings from the run_config with the same rules
    with pytest.raises(ConfigError) as refused:
        run_settings_from_config({**load_schema(), **parse_set(items)})
    assert server == f"error: {refused.value}"


@pytest.mark.parametrize("item", ["num-round=3", 'num-rounds="3"', "kd-enabled=yes"])
def test_server_cli_and_simulation_read_set_items_alike(tmp_path: Path, item: str) -> None:
    server = _error_line(
        ["start", "--run-dir", str(tmp_path / "run"), "--insecure", "--set", item], server_app
    )
    simulation = _error_line(["run", "--out", str(tmp_path / "out"), "--set", item], simulation_cli.app)
    assert server == simulation
    assert "--set" in server


def test_the_simulations_run_table_is_read_as_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text("[run]\nnum-round = 3\n", encoding="utf-8")
    output = _error_line(["run", "--config", str(config), "--out", str(tmp_path / "out")], simulation_cli.app)
    assert str(config) in output
    assert "num-rounds" in output  # the valid keys are listed


def test_the_strategy_setting_takes_the_registered_strategies() -> None:
    """Every party checks ``strategy`` against common's names; the server builds them by those names."""
    from common.config import STRATEGY_NAMES
    from server.strategies import STRATEGIES

    assert sorted(STRATEGY_NAMES) == STRATEGIES.names()


@pytest.mark.parametrize("key", [*SitePolicy.keys(), CACHE_MAX_AGE_KEY])
def test_a_sites_own_policy_is_no_run_setting(key: str) -> None:
    """A site's limits come from its own options (node config), never from the coordinator's settings."""
    assert key not in load_schema()
    with pytest.raises(ConfigError, match="a run setting of pyproject"):
        check_run_config({key: 1})
