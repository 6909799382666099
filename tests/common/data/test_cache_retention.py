"""The decoded-image cache is private to the site's user and can be cleared (all, or by age)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from typer.testing import CliRunner

from client.cli import app
from common.data.cache import build_cache, clear_cache
from common.data.sources import load_catalog
from common.tasks import get_task

NP = get_task("normal-pneumonia")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_cache_is_private(kermany_dir: Path, tmp_path: Path) -> None:
    cached = build_cache(load_catalog("image-folder", kermany_dir, NP), 16, tmp_path / "cache")
    assert _mode(tmp_path / "cache") == 0o700
    assert {_mode(p) for p in (tmp_path / "cache").iterdir()} == {0o600}
    assert cached.path.parent == tmp_path / "cache"


def test_an_existing_open_cache_is_made_private(kermany_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    build_cache(load_catalog("image-folder", kermany_dir, NP), 16, folder)
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
    build_cache(load_catalog("image-folder", kermany_dir, NP), 24, folder)  # a new size: a build
    assert _mode(folder) == 0o700
    assert {_mode(p) for p in folder.iterdir()} == {0o600}


def test_clear_removes_caches_by_age_and_leaves_other_files(kermany_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    catalog = load_catalog("image-folder", kermany_dir, NP)
    old = build_cache(catalog, 16, folder).path
    new = build_cache(catalog, 24, folder).path
    (folder / "notes.txt").write_text("not a cache file")
    long_ago = time.time() - 10 * 86400
    for path in (old, old.with_suffix(".json")):
        os.utime(path, (long_ago, long_ago))
    assert clear_cache(folder, 7).files == 2
    assert not old.exists()
    assert new.exists()
    result = CliRunner().invoke(app, ["cache", "clear", "--cache-dir", str(folder)])
    assert result.exit_code == 0, result.output
    assert "removed 2 cache file(s)" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert clear_cache(tmp_path / "none").files == 0
