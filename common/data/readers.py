"""Image readers: how one catalog record becomes a 2-D greyscale uint8 array.

A reader knows where a source keeps its pixels (files under a root folder, arrays in an npz,
or nothing at all for the procedural synthetic set) and gives each record a *fingerprint*
that changes when the underlying bytes change. The image cache keys on those fingerprints,
so an edited or replaced file is decoded again while untouched ones are not.

Decoding errors (truncated JPEG, not an image, missing file, an image over the cap on decoded
pixels) are raised as :class:`~common.errors.DataError` naming the file, so the cache can skip or
stop on them. The cap (:data:`MAX_IMAGE_PIXELS`, PIL's own default) guards against files whose
header claims a huge size (decompression bombs); a site with larger scans raises it with the
source option ``max-image-pixels``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.data.catalog import ImageRecord
from common.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
"""Default cap on the pixels of one decoded image (PIL's default, about 9459 x 9459)."""
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
_pil_limit = threading.Lock()


@contextmanager
def _opened(path: Path, max_pixels: int) -> Iterator[Image.Image]:
    """``Image.open`` with PIL's bomb check at ``max_pixels`` when a site raised the cap above it.

    PIL keeps its limit in a module global read while the header is parsed; it is raised under a
    lock for that moment only. Every image is checked against its own cap after opening anyway.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or max_pixels <= limit:
        with Image.open(path) as img:
            yield img
        return
    with _pil_limit:
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    with img:
        yield img


def _stretch(img: Image.Image, path: Path) -> np.ndarray:
    """16-bit, 32-bit integer and float images (DICOM exports, float TIFF): min-max to 8 bit."""
    arr = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        raise DataError(f"image {path} has no finite pixel value (all NaN or infinite); re-export it")
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    scaled = (np.where(finite, arr, lo) - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return np.ascontiguousarray(scaled.round().astype(np.uint8))


def decode_image_file(
    path: Path, *, draft_size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode an image file into a 2-D greyscale uint8 array.

    ``draft_size`` lets the JPEG decoder skip detail it will throw away (DCT scaling), which
    makes decoding large originals several times faster when the cache only wants e.g. 64 px.
    The draft never goes below ``draft_size`` on the shorter side. An image of more than
    ``max_pixels`` pixels is refused before its pixels are decoded. DICOM files (by extension
    or preamble, e.g. the paths of a manifest written from a ``dicom`` source) are rendered by
    :func:`common.data.dicom.decode_dicom_file`.
    """
    from common.data.dicom import decode_dicom_file, is_dicom_file

    if path.suffix.lower() not in IMAGE_SUFFIXES and is_dicom_file(path):
        return decode_dicom_file(path)
    try:
        with _opened(path, max_pixels) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DataError(_too_large(path, width, height, max_pixels))
            if draft_size is not None and img.format == "JPEG":
                img.draft("L", (draft_size, draft_size))
            img.load()
            if img.mode in _WIDE_MODES:
                return _stretch(img, path)
            grey = img.convert("L")
            return np.asarray(grey, dtype=np.uint8).copy()
    except Image.DecompressionBombError as exc:  # PIL's own check, at twice its limit
        raise DataError(
            f"image {path}: {exc} Over the cap of {max_pixels:,} decoded pixels; if it is a real scan, "
            "raise the cap with the source option max-image-pixels=N"
        ) from None
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist; check the data folder or the manifest") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"cannot decode image {path}: {exc}. Re-export the file, remove it, or run without "
            "--strict to skip unreadable images"
        ) from None


def _too_large(path: Path, width: int, height: int, max_pixels: int) -> str:
    return (
        f"image {path} claims {width} x {height} = {width * height:,} pixels, over the cap of "
        f"{max_pixels:,} decoded pixels (a damaged file or a decompression bomb); if it is a real scan, "
        "raise the cap with the source option max-image-pixels=N"
    )


class FileReader:
    """Reads records whose ``key`` is a path relative to ``root``."""

    def __init__(self, root: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels

    def path(self, record: ImageRecord) -> Path:
        return self.root / record.key

    def read(self, record: ImageRecord) -> np.ndarray:
        return decode_image_file(self.path(record), max_pixels=self.max_pixels)

    def fingerprint(self, record: ImageRecord) -> str:
        path = self.path(record)
        cap = "" if self.max_pixels == MAX_IMAGE_PIXELS else f":max{self.max_pixels}"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return f"{path}:missing{cap}"
        return f"{path}:{st.st_size}:{st.st_mtime_ns}{cap}"


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
