"""The study's resource options (Ray GPU share, an existing Ray cluster, CPUs per site) reach its cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from research.study.cells import Cell, StudySettings, cell_run_config, with_resources


def test_the_study_resource_options_are_checked(tmp_path: Path) -> None:
    base = StudySettings(config_file=tmp_path / "s.toml", out=tmp_path, results=tmp_path, datasets={}, run={})

    settings = with_resources(base, 0.25, "127.0.0.1:6379")

    assert (settings.gpus_per_site, settings.ray_address) == (0.25, "127.0.0.1:6379")
    with pytest.raises(ConfigError):
        with_resources(base, -1, "")


def test_the_study_cpus_per_site_reach_the_cells_and_are_checked(tmp_path: Path) -> None:
    base = StudySettings(config_file=tmp_path / "s.toml", out=tmp_path, results=tmp_path, datasets={}, run={})

    assert with_resources(base, 0.0, "", 2).cpus_per_site == 2
    assert with_resources(base, 0.0, "").cpus_per_site == 1
    with pytest.raises(ConfigError, match="cpus-per-site"):
        with_resources(base, 0.0, "", 0)


def test_a_site_with_two_cpus_trains_with_two_threads(tmp_path: Path) -> None:
    base = StudySettings(config_file=tmp_path / "s.toml", out=tmp_path, results=tmp_path, datasets={}, run={})
    cell = Cell("privacy", "cxr", "dirichlet-0.5", "fedavg", 0, dp_epsilon=8.0, norm="group")

    assert "num-threads" not in cell_run_config(cell, base, 5)
    assert cell_run_config(cell, with_resources(base, 0.0, "", 2), 5)["num-threads"] == 2
