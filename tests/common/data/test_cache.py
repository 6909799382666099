"""Image cache: decode once, reuse, re-read changed files, skip or refuse corrupt images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.cache import build_cache, cache_key, resize_square
from common.data.duplicates import find_duplicates
from common.data.readers import FileReader
from common.data.sources import load_catalog
from common.errors import DataError
from common.tasks import get_task
from tests.common.data.helpers import write_image

NP = get_task("normal-pneumonia")


class CountingReader(FileReader):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls = 0

    def read(self, record):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().read(record)


def test_resize_keeps_aspect_and_centre_crops() -> None:
    img = np.zeros((20, 40), dtype=np.uint8)
    img[:, 10:30] = 200  # a bright centre band, half the width
    out = resize_square(img, 10)
    assert out.shape == (10, 10)
    # shorter side 20 -> 10, width 40 -> 20, crop columns 5..15: the band fills the crop
    assert out[:, 1:-1].min() > 150
    np.testing.assert_array_equal(resize_square(np.full((8, 8), 7, np.uint8), 8), np.full((8, 8), 7))


def test_second_build_reads_no_image_and_changed_file_is_reread(kermany_dir: Path, tmp_path: Path) -> None:
    catalog = load_catalog("image-folder", kermany_dir, NP)
    reader = CountingReader(kermany_dir)
    catalog.readers[catalog.records[0].source] = reader
    cache_dir = tmp_path / "cache"
    first = build_cache(catalog, 16, cache_dir)
    assert reader.calls == 8
    assert not first.reused
    assert first.images.shape == (8, 16, 16)
    assert isinstance(first.images, np.memmap)
    expected = resize_square(np.asarray(Image.open(kermany_dir / catalog.records[3].key)), 16)
    np.testing.assert_array_equal(first.images[3], expected)

    second = build_cache(catalog, 16, cache_dir)
    assert reader.calls == 8  # nothing decoded again
    assert second.reused
    np.testing.assert_array_equal(np.asarray(second.images), np.asarray(first.images))

    changed = kermany_dir / catalog.records[2].key
    write_image(changed, value=255)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = build_cache(catalog, 16, cache_dir)
    assert not third.reused
    assert third.images[2].min() == 255
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [
        ".json",
        ".json",
        ".npy",
        ".npy",
    ]  # no temp files


def test_cache_survives_deleting_the_source_files(kermany_dir: Path, tmp_path: Path) -> None:
    catalog = load_catalog("image-folder", kermany_dir, NP)
    key_before = cache_key(catalog, 16)
    first = build_cache(catalog, 16, tmp_path / "cache")
    assert first.path.name == f"{key_before}.npy"
    # A size change is another cache entry.
    assert cache_key(catalog, 32) != key_before


def test_truncated_jpeg_is_skipped_and_counted(kermany_dir: Path, tmp_path: Path) -> None:
    bad = kermany_dir / "train" / "NORMAL" / "IM-0200-0001.jpeg"
    write_image(bad, size=(64, 64), seed=9)
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    (kermany_dir / "train" / "NORMAL" / "IM-0201-0001.jpeg").write_bytes(b"not an image")
    catalog = load_catalog("image-folder", kermany_dir, NP)
    assert len(catalog) == 10
    progress: list[tuple[int, int]] = []
    cached = build_cache(catalog, 16, tmp_path / "cache", progress=lambda d, t: progress.append((d, t)))
    assert len(cached) == 8
    assert {s.key for s in cached.skipped} == {
        "train/NORMAL/IM-0200-0001.jpeg",
        "train/NORMAL/IM-0201-0001.jpeg",
    }
    assert progress[-1] == (10, 10)
    assert all(r.key not in {s.key for s in cached.skipped} for r in cached.catalog.records)
    np.testing.assert_array_equal(cached.catalog.targets, catalog.targets[cached.source_indices])
    again = build_cache(catalog, 16, tmp_path / "cache")
    assert again.reused
    assert len(again.skipped) == 2

    with pytest.raises(DataError, match=r"IM-020[01]-0001.jpeg"):
        build_cache(catalog, 16, tmp_path / "strict-cache", strict=True)
    assert list((tmp_path / "strict-cache").iterdir()) == []  # an aborted build leaves nothing behind


def test_exact_duplicates_are_found_across_names(kermany_dir: Path, tmp_path: Path) -> None:
    src = kermany_dir / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    (kermany_dir / "test" / "NORMAL" / "IM-0999-0001.jpeg").write_bytes(src.read_bytes())
    # The same pixels saved as PNG under another name: pixel-identical, not byte-identical.
    Image.open(src).save(kermany_dir / "test" / "PNEUMONIA" / "person9_virus_9.png")
    catalog = load_catalog("image-folder", kermany_dir, NP)
    cached = build_cache(catalog, 16, tmp_path / "cache")
    report = find_duplicates(cached)
    keys = [{cached.catalog.records[r].key for r in g} for g in report.groups]
    assert keys == [
        {
            "train/NORMAL/IM-0115-0001.jpeg",
            "test/NORMAL/IM-0999-0001.jpeg",
            "test/PNEUMONIA/person9_virus_9.png",
        }
    ]
    assert report.n_duplicates == 2
    keep = report.keep_rows()
    assert len(keep) == len(cached) - 2
    assert len({cached.pixel_hashes[i] for i in keep}) == len(keep)
    near = find_duplicates(cached, level="near")
    assert near.n_duplicates >= 2
