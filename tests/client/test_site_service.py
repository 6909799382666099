"""The long-running site: its systemd unit (kit template and the site's own) and its per-run outputs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from client.site import PER_RUN_OUTPUTS_KEY, for_run, site_from_node_config
from common.kit import site_service_unit
from common.run_settings import run_settings_from_config
from tests.helpers import flower_run_config


def _sections(unit: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in unit.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        assert current is not None, f"{line!r} outside a section"
        current[key] = value
    return sections


def test_the_unit_runs_serve_sh_and_counts_sigterm_as_a_clean_stop(tmp_path: Path) -> None:
    unit = _sections(site_service_unit("st-marys", tmp_path / "site", "hospital"))

    assert set(unit) == {"Unit", "Service", "Install"}
    assert unit["Service"]["ExecStart"] == f"/bin/sh {tmp_path / 'site'}/serve.sh"
    assert unit["Service"]["User"] == "hospital"
    assert unit["Service"]["SuccessExitStatus"] == "130"
    assert unit["Service"]["UMask"] == "0077"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "serve.sh").write_text("#!/bin/sh\nexit 0\n")
    path = tmp_path / "cxr-fl-st-marys.service"
    path.write_text(site_service_unit("st-marys", site_dir))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True, check=False
    )
    problems = [line for line in result.stderr.splitlines() if "cxr-fl-st-marys.service" in line]
    assert result.returncode == 0, result.stderr
    assert not problems, problems


def test_a_long_running_site_keeps_each_runs_outputs_apart(tmp_path: Path) -> None:
    settings = run_settings_from_config(flower_run_config())
    node = {"site-name": "a", "data-format": "synthetic", "out-dir": str(tmp_path / "out")}
    site = site_from_node_config(node, settings)
    assert for_run(site, node, 5) == site  # `start`: one run, its outputs in OUT

    serving = {**node, PER_RUN_OUTPUTS_KEY: True, "state-dir": str(tmp_path / "state")}
    site = site_from_node_config(serving, settings)
    run5, run6 = for_run(site, serving, 5), for_run(site, serving, 6)
    assert run5.out_dir == tmp_path / "out" / "runs" / "5"
    assert run6.out_dir == tmp_path / "out" / "runs" / "6"
    assert run5.state_dir == run6.state_dir == tmp_path / "state"  # one ledger, one audit trail
    assert run5.cache_dir == run6.cache_dir == tmp_path / "out" / "cache"
