"""The study is research (research/study): outside the installed packages and the app bundle.

A site accepts by default only the app hash that its own installation builds (``fab-include`` of
``[tool.flwr.app]``), so an edit to the study (a caption, a target) must not change that hash.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from flower_adapter.app_runner import installed_app_hash

REPO = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def _copy_project(target: Path) -> Path:
    """pyproject.toml, every top-level folder that fab-include names, and research/study."""
    target.mkdir(parents=True)
    shutil.copy2(REPO / "pyproject.toml", target / "pyproject.toml")
    included = {pattern.split("/")[0] for pattern in _pyproject()["tool"]["flwr"]["app"]["fab-include"]}
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in sorted(included | {"research/study"}):
        shutil.copytree(REPO / folder, target / folder, ignore=ignore)
    return target


def test_editing_the_study_leaves_the_app_hash_as_it_is(tmp_path: Path) -> None:
    project = _copy_project(tmp_path / "cxr-fl")
    original = installed_app_hash(project)

    with (project / "research" / "study" / "report.py").open("a", encoding="utf-8") as handle:
        handle.write("\nCAPTION = 'edited'\n")
    (project / "research" / "study" / "study.toml").write_text("seeds = [7]\n", encoding="utf-8")
    assert installed_app_hash(project) == original

    with (project / "simulation" / "cli.py").open("a", encoding="utf-8") as handle:
        handle.write("\nCAPTION = 'edited'\n")  # the same edit to the product's code is seen
    assert installed_app_hash(project) != original


def test_the_study_is_in_no_installed_package_and_no_app_pattern() -> None:
    settings = _pyproject()
    packages = settings["tool"]["setuptools"]["packages"]
    patterns = settings["tool"]["flwr"]["app"]["fab-include"]

    assert not [p for p in packages if p.split(".")[0] in ("research", "benchmarks")]
    assert not [p for p in patterns if p.startswith(("research", "benchmarks"))]
    assert not list((REPO / "simulation").glob("study*.py"))
