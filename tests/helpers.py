"""Helpers that tests in several folders share (fixtures are in tests/conftest.py).

`flower_run_config` is the run_config a ServerApp/ClientApp sees; `two_site_partition` writes the
manifests of a tiny two-site simulation; `copy_project` copies the files an app bundle holds;
`PROJECT_ROOT` and `PACKAGES` name the project and its packages.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "flower_adapter", "server", "client", "simulation", "benchmarks")
"""The project's top-level packages (the installed ones and the benchmarks)."""


def flower_run_config(**overrides: object) -> dict[str, object]:
    """The run_config a ServerApp/ClientApp sees: pyproject's schema defaults plus overrides."""
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        config = dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
    for key, value in overrides.items():
        key = key.replace("_", "-")
        if key not in config:
            raise KeyError(f"'{key}' is not a run setting in pyproject.toml")
        config[key] = value
    return config


def two_site_partition(folder: Path, n_images: int, seed: int) -> Path:
    """The manifests of ``n_images`` synthetic 32 px chest X-rays split IID over two sites."""
    from common.data.sources import load_catalog
    from common.tasks import get_task
    from simulation.partition import partition_catalog, write_partition

    task = get_task("normal-pneumonia-covid")
    catalog = load_catalog(
        "synthetic", None, task, options={"n_images": n_images, "image_size": 32, "seed": seed}
    )
    partition = partition_catalog(catalog, "iid", 2, seed=1)
    return write_partition(folder, catalog, partition, source_paths={"synthetic": None})


def copy_project(target: Path) -> Path:
    """The files of this cxr-fl project that an app bundle can hold (code and pyproject.toml)."""
    target.mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", target / "pyproject.toml")
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        packages = tomllib.load(handle)["tool"]["setuptools"]["packages"]
    for package in sorted({name.split(".")[0] for name in packages}):
        shutil.copytree(
            PROJECT_ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return target
