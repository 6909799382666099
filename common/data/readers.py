"""Image readers: how one catalog record becomes a 2-D greyscale uint8 array.

A reader knows where a source keeps its pixels (files under a root folder, arrays in an npz,
or nothing at all for the procedural synthetic set) and gives each record a *fingerprint*
that changes when the underlying bytes change. The image cache keys on those fingerprints,
so an edited or replaced file is decoded again while untouched ones are not.

Decoding errors (truncated JPEG, not an image, missing file) are raised as
:class:`~common.errors.DataError` naming the file, so the cache can skip or stop on them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.data.catalog import ImageRecord
from common.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


def decode_image_file(path: Path, *, draft_size: int | None = None) -> np.ndarray:
    """Decode an image file into a 2-D greyscale uint8 array.

    ``draft_size`` lets the JPEG decoder skip detail it will throw away (DCT scaling), which
    makes decoding large originals several times faster when the cache only wants e.g. 64 px.
    The draft never goes below ``draft_size`` on the shorter side. DICOM files (by extension
    or preamble, e.g. the paths of a manifest written from a ``dicom`` source) are rendered by
    :func:`common.data.dicom.decode_dicom_file`.
    """
    from common.data.dicom import decode_dicom_file, is_dicom_file

    if path.suffix.lower() not in IMAGE_SUFFIXES and is_dicom_file(path):
        return decode_dicom_file(path)
    try:
        with Image.open(path) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft("L", (draft_size, draft_size))
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit PNG / DICOM exports: stretch to 8 bit instead of clipping.
                arr = np.asarray(img, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
                return np.ascontiguousarray(scaled.round().astype(np.uint8))
            grey = img.convert("L")
            return np.asarray(grey, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist; check the data folder or the manifest") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot decode image {path}: {exc}. Re-export the file, remove it, or run without "
            "--strict to skip unreadable images"
        ) from None


class FileReader:
    """Reads records whose ``key`` is a path relative to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, record: ImageRecord) -> Path:
        return self.root / record.key

    def read(self, record: ImageRecord) -> np.ndarray:
        return decode_image_file(self.path(record))

    def fingerprint(self, record: ImageRecord) -> str:
        path = self.path(record)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return f"{path}:missing"
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"


class ArrayReader:
    """Reads records from in-memory arrays (MedMNIST npz): ``key`` is ``split/index``."""

    def __init__(self, arrays: dict[str, np.ndarray], origin: str) -> None:
        self.arrays = arrays
        self.origin = origin

    def read(self, record: ImageRecord) -> np.ndarray:
        split, _, index = record.key.partition("/")
        img = self.arrays[split][int(index)]
        if img.ndim == 3:  # RGB variants: average the channels to greyscale
            img = img.mean(axis=-1).round()
        return np.ascontiguousarray(img.astype(np.uint8))

    def fingerprint(self, record: ImageRecord) -> str:
        return f"{self.origin}:{record.key}"
