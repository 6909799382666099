"""Setuptools hook: a built wheel carries the project's pyproject.toml and .gitignore.

Flower identifies an app by the hash of the bundle ``flwr run`` packs from the project folder
(pyproject.toml and the files its ``fab-include`` names). A site installed from a wheel has the
packages' files but no project folder; with these two files shipped inside the
``flower_adapter`` package (``flower_adapter/app_identity/``) it builds the very same bundle
from its installed files (flower_adapter/app_runner.py ``installed_app_hash``), so its default
allow-list is its own app's hash.
Everything else is configured in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
IDENTITY_FILES = {"pyproject.toml": "pyproject.toml", ".gitignore": "gitignore"}


class BuildPyWithAppIdentity(build_py):
    """``build_py``, then the app's identity files into ``flower_adapter/app_identity/``."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "flower_adapter" / "app_identity"
        target.mkdir(parents=True, exist_ok=True)
        for source, name in IDENTITY_FILES.items():
            if (ROOT / source).is_file():
                shutil.copyfile(ROOT / source, target / name)


setup(cmdclass={"build_py": BuildPyWithAppIdentity})
