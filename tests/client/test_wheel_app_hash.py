"""A site installed from the built wheel (no project folder) computes the coordinator's app hash.

The wheel is built from a copy of the project's packaged files (``pip wheel --no-deps
--no-build-isolation --no-index``: offline), installed with ``pip --python`` into a fresh
virtual environment without pip, and that environment's ``cxr-fl-client app-hash`` is compared
with the hash ``flwr run`` gives the project folder. The fresh environment sees the main
environment's dependencies (torch, flwr, ...) through a ``.pth`` line, which adds their folder
without running the main environment's own ``.pth`` files (its editable cxr-fl is not seen):
the ``client`` package imported there is the wheel's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from flower_adapter.app_runner import installed_app_hash

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGED = ("pyproject.toml", "setup.py", ".gitignore", "README.md")
with (PROJECT_ROOT / "pyproject.toml").open("rb") as _handle:
    PACKAGES = sorted(
        {name.split(".")[0] for name in tomllib.load(_handle)["tool"]["setuptools"]["packages"]}
    )


def _run(*args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _source_copy(root: Path) -> Path:
    source = root / "src"
    source.mkdir()
    for name in PACKAGED:
        shutil.copyfile(PROJECT_ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(
            PROJECT_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return source


def test_a_wheel_installed_site_computes_the_project_folders_app_hash(tmp_path: Path) -> None:
    source = _source_copy(tmp_path)
    pip = [sys.executable, "-m", "pip"]
    _run(
        *pip,
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        "wheels",
        str(source),
        cwd=tmp_path,
    )
    wheels = list((tmp_path / "wheels").glob("cxr_fl-*.whl"))
    assert len(wheels) == 1
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    site_packages = Path(
        _run(
            str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path
        ).strip()
    )
    (site_packages / "main-env-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(
        *pip,
        "--python",
        str(python),
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        str(wheels[0]),
        cwd=tmp_path,
    )

    where = _run(str(python), "-c", "import client; print(client.__file__)", cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(site_packages)  # the wheel's code, no project folder
    assert not (site_packages / "pyproject.toml").exists()
    wheel_hash = _run(str(venv / "bin" / "cxr-fl-client"), "app-hash", cwd=tmp_path).strip()
    assert wheel_hash == installed_app_hash(PROJECT_ROOT)


def test_without_a_project_folder_or_shipped_pyproject_the_site_is_told_to_pass_allow_app(
    tmp_path: Path,
) -> None:
    import pytest

    from common.errors import CxrFlError

    with pytest.raises(CxrFlError, match="--allow-app"):
        installed_app_hash(tmp_path, tmp_path / "app_identity")
