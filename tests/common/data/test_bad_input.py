"""Bad data that must end in a clear error (or a counted, explained skip), never a traceback."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.cache import build_cache
from common.data.dataset import CxrDataset
from common.data.readers import decode_image_file
from common.data.sources import load_catalog
from common.errors import DataError
from common.tasks import get_task
from tests.common.data.helpers import write_csv, write_image

NP = get_task("normal-pneumonia")


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels (its data is a few bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
    return path


def _folder_with_a_bomb(root: Path) -> Path:
    for i in range(2):
        write_image(root / "NORMAL" / f"n{i}.png", seed=i)
        write_image(root / "PNEUMONIA" / f"p{i}.png", seed=10 + i)
    _png_claiming(root / "PNEUMONIA" / "bomb.png", 40_000, 40_000)
    return root


def test_an_image_claiming_a_huge_size_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = _png_claiming(tmp_path / "bomb.png", 40_000, 40_000)
    with pytest.raises(DataError, match=r"bomb\.png.*max-image-pixels"):
        decode_image_file(bomb)
    small = write_image(tmp_path / "small.png", size=(30, 20))
    with pytest.raises(DataError, match="600 pixels"):
        decode_image_file(small, max_pixels=100)
    assert decode_image_file(small, max_pixels=600).shape == (20, 30)


def test_a_bomb_is_a_counted_unreadable_image_or_a_strict_error(tmp_path: Path) -> None:
    root = _folder_with_a_bomb(tmp_path / "site")
    catalog = load_catalog("image-folder", root, NP)
    cached = build_cache(catalog, 16, tmp_path / "cache")
    assert len(cached) == 4
    assert [s.key for s in cached.skipped] == ["PNEUMONIA/bomb.png"]
    assert "max-image-pixels" in cached.skipped[0].reason
    with pytest.raises(DataError, match=r"bomb\.png.*strict"):
        build_cache(catalog, 16, tmp_path / "other-cache", strict=True)


def test_a_site_can_raise_the_pixel_cap(tmp_path: Path) -> None:
    root = tmp_path / "site"
    for i in range(2):
        write_image(root / "NORMAL" / f"n{i}.png", seed=i, size=(40, 30))
        write_image(root / "PNEUMONIA" / f"p{i}.png", seed=10 + i, size=(40, 30))
    low = load_catalog("image-folder", root, NP, options={"max-image-pixels": "1000"})
    assert len(build_cache(low, 16, tmp_path / "cache").skipped) == 4
    high = load_catalog("image-folder", root, NP, options={"max-image-pixels": "1200"})
    assert len(build_cache(high, 16, tmp_path / "cache").skipped) == 0


def test_strict_holds_when_the_cache_already_has_the_images(tmp_path: Path) -> None:
    root = _folder_with_a_bomb(tmp_path / "site")
    catalog = load_catalog("image-folder", root, NP)
    assert len(build_cache(catalog, 16, tmp_path / "cache").skipped) == 1
    with pytest.raises(DataError, match=r"bomb\.png.*strict"):
        build_cache(catalog, 16, tmp_path / "cache", strict=True)


def test_a_cache_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    root = _folder_with_a_bomb(tmp_path / "site")
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(DataError, match="is a file; choose another --cache-dir"):
        build_cache(load_catalog("image-folder", root, NP), 16, tmp_path / "cache")


def test_a_float32_tiff_is_scaled_not_black(tmp_path: Path) -> None:
    pixels = np.linspace(0.0, 1.0, 20 * 30, dtype=np.float32).reshape(20, 30)
    Image.fromarray(pixels, mode="F").save(tmp_path / "scan.tif")
    decoded = decode_image_file(tmp_path / "scan.tif")
    assert decoded.min() == 0
    assert decoded.max() == 255
    Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="no finite pixel"):
        decode_image_file(tmp_path / "nan.tif")


def test_a_manifest_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_bytes("path,label,site\na.png,normal,Hôpital\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"m\.csv is not UTF-8"):
        load_catalog("manifest", tmp_path / "m.csv", NP)


def test_an_image_listed_twice_with_different_labels_names_both_rows(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    rows = [("a.png", "normal"), ("b.png", "pneumonia"), ("./a.png", "pneumonia")]
    write_csv(tmp_path / "m.csv", ("path", "label"), rows)
    with pytest.raises(DataError, match=r"'\./a\.png' is listed on line 2 as 'normal' and on line 4"):
        load_catalog("manifest", tmp_path / "m.csv", NP)


def test_identical_repeated_rows_are_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    rows = [("a.png", "normal"), ("b.png", "pneumonia"), ("a.png", "normal")]
    write_csv(tmp_path / "m.csv", ("path", "label"), rows)
    with caplog.at_level(logging.WARNING):
        catalog = load_catalog("manifest", tmp_path / "m.csv", NP)
    assert len(catalog) == 2
    assert "repeat an earlier row" in caplog.text
    assert "lines 4" in caplog.text


def test_an_empty_poisson_batch_is_an_empty_list(tmp_path: Path) -> None:
    root = _folder_with_a_bomb(tmp_path / "site")
    cached = build_cache(load_catalog("image-folder", root, NP), 16, tmp_path / "cache")
    dataset = CxrDataset(cached, np.arange(len(cached)), augment=True)
    assert dataset.__getitems__([]) == []
    assert len(dataset.__getitems__([0, 1])) == 2
