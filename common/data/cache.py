"""The image cache: every image decoded and resized once, then memory-mapped for all epochs.

:func:`build_cache` decodes each record of a catalog (threads; PIL releases the GIL while
decoding), converts it to greyscale, resizes it to ``image_size`` x ``image_size`` and stores
all images in one uint8 ``.npy`` array on disk, opened memory-mapped. Training epochs then read
these arrays only; no JPEG/PNG is decoded again.

Geometry: the shorter side is resized to ``image_size`` (bilinear, antialiased) and the longer
side is centre-cropped, the usual CXR convention (torchvision ``Resize`` + ``CenterCrop``,
torchxrayvision's centre crop + resize). Nothing is stretched; with the near-square CXRs of
the public sets the crop removes at most a few per cent at the lateral edges.

Keys: the file name is the SHA-1 of (preprocessing version, size, and for every record its
source, key and reader fingerprint). File readers fingerprint (path, byte size, mtime_ns), so a
replaced or edited image gives a new key and is decoded again; an unchanged catalog finds its
cache and decodes nothing. A build writes ``<key>.npy`` and ``<key>.json`` under temporary
names and renames them into place (the JSON last, as the commit marker), so an interrupted build
leaves no file that a later run could mistake for a complete cache.

Unreadable images (missing, truncated, not an image) are skipped with a warning and listed in
:attr:`CachedImages.skipped`; with ``strict=True`` the first one raises DataError naming it.
The cache also stores, per image, the SHA-1 of its decoded pixels at native resolution
(exact-duplicate detection, :mod:`common.data.duplicates`).

Privacy and retention: decoded images are patient data. The cache folder is made 0700 and its
files 0600 (:func:`make_private`, also applied to an existing cache folder of this user);
:func:`clear_cache` removes caches, all or those older than a maximum age (``cxr-fl-client cache
clear``; a site policy's ``cache-max-age-days`` applies it when the site starts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.catalog import Catalog, ImageRecord
from common.errors import DataError

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = "gray-shorter-side-center-crop-bilinear-v1"
CACHE_DIR_ENV = "CXR_FL_CACHE_DIR"

ProgressCallback = Callable[[int, int], None]
"""``progress(done, total)``, called from the building thread after each image."""


def default_cache_dir() -> Path:
    """``$CXR_FL_CACHE_DIR`` or ``~/.cache/cxr-fl/images``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cxr-fl" / "images"


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop the longer one (uint8 in, uint8 out)."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D greyscale array, got shape {image.shape}")
    h, w = image.shape
    if h == size and w == size:
        return np.ascontiguousarray(image)
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = Image.fromarray(image, mode="L").resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


@dataclass(frozen=True)
class SkippedImage:
    """A record that could not be decoded; ``index`` is its position in the input catalog."""

    index: int
    source: str
    key: str
    reason: str


@dataclass
class CachedImages:
    """Decoded images of a catalog, aligned with :attr:`catalog` (the readable records).

    Attributes:
        catalog: the input catalog without the skipped records; row i of ``images`` is record i.
        images: uint8 array [N, S, S], memory-mapped read-only.
        image_size: S.
        path: the ``.npy`` file behind ``images``.
        skipped: records that could not be decoded (with the reason).
        source_indices: for each row, its index in the catalog given to :func:`build_cache`.
        pixel_hashes: SHA-1 of each image's decoded pixels at native resolution.
        reused: True when the cache was found on disk and nothing was decoded.
    """

    catalog: Catalog
    images: np.ndarray
    image_size: int
    path: Path
    skipped: tuple[SkippedImage, ...]
    source_indices: np.ndarray
    pixel_hashes: tuple[str, ...]
    reused: bool

    def __len__(self) -> int:
        return len(self.catalog)

    @property
    def nbytes_on_disk(self) -> int:
        return self.path.stat().st_size


def cache_key(catalog: Catalog, image_size: int) -> str:
    """SHA-1 over the preprocessing, the size and every record's (source, key, fingerprint)."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"{PREPROCESS_VERSION}|{image_size}|{len(catalog)}\n".encode())
    for record in catalog.records:
        fp = catalog.readers[record.source].fingerprint(record)
        digest.update(f"{record.source}\x1f{record.key}\x1f{fp}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Decoded:
    index: int
    image: np.ndarray | None
    pixel_hash: str
    reason: str


def _decode_one(catalog: Catalog, index: int, record: ImageRecord, size: int) -> _Decoded:
    try:
        native = catalog.readers[record.source].read(record)
    except DataError as exc:
        return _Decoded(index, None, "", str(exc))
    if native.ndim != 2 or native.size == 0:
        return _Decoded(index, None, "", f"{record.key}: decoded to shape {native.shape}, not a 2-D image")
    pixel_hash = hashlib.sha1(
        f"{native.shape}".encode() + native.tobytes(), usedforsecurity=False
    ).hexdigest()
    return _Decoded(index, resize_square(native, size), pixel_hash, "")


class ImageCache:
    """A folder of cached image arrays; :meth:`build` finds or builds one per (catalog, size)."""

    def __init__(self, cache_dir: Path | str | None = None, *, workers: int = 2) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.workers = max(1, workers)

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.cache_dir / f"{key}.npy", self.cache_dir / f"{key}.json"

    def build(
        self,
        catalog: Catalog,
        image_size: int,
        *,
        strict: bool = False,
        progress: ProgressCallback | None = None,
    ) -> CachedImages:
        if image_size < 8:
            raise DataError(f"image size {image_size} is too small; use at least 8 (e.g. 64 or 224)")
        if len(catalog) == 0:
            raise DataError("the catalog has no images to cache")
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise DataError(f"cache folder {self.cache_dir} is a file; choose another --cache-dir")
        key = cache_key(catalog, image_size)
        npy_path, json_path = self.paths(key)
        loaded = self._load(catalog, image_size, npy_path, json_path)
        if loaded is not None:
            logger.info("image cache hit: %s (%d images at %d px)", npy_path, len(loaded), image_size)
            if strict and loaded.skipped:
                raise DataError(
                    f"{loaded.skipped[0].reason} (strict mode: no image may be unreadable; "
                    f"{len(loaded.skipped)} were skipped when the cache {npy_path.name} was built)"
                )
            if progress is not None:
                progress(len(catalog), len(catalog))
            return loaded
        try:
            self.cache_dir.parent.mkdir(parents=True, exist_ok=True)
            self.cache_dir.mkdir(mode=0o700, exist_ok=True)
            make_private(self.cache_dir)
        except OSError as exc:
            raise DataError(
                f"cannot make the cache folder {self.cache_dir}: {exc.strerror}; choose another --cache-dir"
            ) from None
        return self._build(catalog, image_size, strict, progress, npy_path, json_path)

    def _load(self, catalog: Catalog, size: int, npy_path: Path, json_path: Path) -> CachedImages | None:
        if not (npy_path.is_file() and json_path.is_file()):
            return None
        try:
            meta = json.loads(json_path.read_text())
            images = np.load(npy_path, mmap_mode="r")
            kept = np.asarray(meta["kept"], dtype=np.int64)
            if images.shape != (len(kept), size, size) or meta["n_records"] != len(catalog):
                raise ValueError(f"shape {images.shape} does not match the index")
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            logger.warning("ignoring damaged cache %s (%s); rebuilding", npy_path, exc)
            return None
        skipped = tuple(SkippedImage(**s) for s in meta["skipped"])
        return CachedImages(
            catalog.subset(kept), images, size, npy_path, skipped, kept, tuple(meta["hashes"]), reused=True
        )

    def _decoded(self, catalog: Catalog, size: int) -> Iterator[_Decoded]:
        records = catalog.records
        if self.workers == 1:
            for i, record in enumerate(records):
                yield _decode_one(catalog, i, record, size)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cxr-decode") as pool:
            # Bounded look-ahead keeps memory flat for large catalogs.
            window = self.workers * 16
            pending = [pool.submit(_decode_one, catalog, i, r, size) for i, r in enumerate(records[:window])]
            nxt = len(pending)
            head = 0
            try:
                while head < len(pending):
                    result = pending[head].result()
                    pending[head] = None  # type: ignore[call-overload]
                    head += 1
                    if nxt < len(records):
                        pending.append(pool.submit(_decode_one, catalog, nxt, records[nxt], size))
                        nxt += 1
                    yield result
            finally:
                for fut in pending[head:]:
                    if fut is not None:
                        fut.cancel()

    def _temporary(self, stem: str, suffix: str) -> Path:
        """A fresh hidden file in the cache folder (moved into place once complete)."""
        fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=suffix, dir=self.cache_dir)
        os.close(fd)
        return Path(name)

    def _decode_into(
        self,
        array: np.ndarray,
        catalog: Catalog,
        size: int,
        strict: bool,
        progress: ProgressCallback | None,
    ) -> tuple[np.ndarray, list[str], list[SkippedImage]]:
        """Decode every image into its row of ``array``; returns which rows were read, their pixel
        hashes and the unreadable images (refused in ``strict`` mode)."""
        n = len(catalog)
        ok = np.zeros(n, dtype=bool)
        hashes = [""] * n
        skipped: list[SkippedImage] = []
        for done, item in enumerate(self._decoded(catalog, size), start=1):
            if item.image is None:
                record = catalog.records[item.index]
                if strict:
                    raise DataError(f"{item.reason} (strict mode: no image may be unreadable)")
                logger.warning("skipping unreadable image %s: %s", record.key, item.reason)
                skipped.append(SkippedImage(item.index, record.source, record.key, item.reason))
            else:
                array[item.index] = item.image
                ok[item.index] = True
                hashes[item.index] = item.pixel_hash
            if progress is not None:
                progress(done, n)
        return ok, hashes, skipped

    def _build(
        self,
        catalog: Catalog,
        size: int,
        strict: bool,
        progress: ProgressCallback | None,
        npy_path: Path,
        json_path: Path,
    ) -> CachedImages:
        n = len(catalog)
        tmp_files: list[Path] = []
        try:
            tmp_npy = self._temporary(npy_path.stem, ".npy.tmp")
            tmp_files.append(tmp_npy)
            array = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(n, size, size))
            ok, hashes, skipped = self._decode_into(array, catalog, size, strict, progress)
            kept = np.flatnonzero(ok)
            if skipped:
                logger.warning("%d of %d images could not be read and were skipped", len(skipped), n)
                tmp_npy = self._temporary(npy_path.stem, ".npy.tmp")
                tmp_files.append(tmp_npy)
                compact = np.lib.format.open_memmap(
                    tmp_npy, mode="w+", dtype=np.uint8, shape=(len(kept), size, size)
                )
                compact[:] = array[kept]
                compact.flush()
                del compact
            array.flush()
            del array
            meta = {
                "version": PREPROCESS_VERSION,
                "image_size": size,
                "n_records": n,
                "kept": kept.tolist(),
                "skipped": [s.__dict__ for s in skipped],
                "hashes": [hashes[i] for i in kept],
            }
            fd, tmp_json_name = tempfile.mkstemp(
                prefix=f".{json_path.stem}.", suffix=".json.tmp", dir=self.cache_dir
            )
            with os.fdopen(fd, "w") as fh:
                json.dump(meta, fh)
            tmp_files.append(Path(tmp_json_name))
            os.replace(tmp_npy, npy_path)
            os.replace(tmp_json_name, json_path)
        finally:
            for tmp in tmp_files:
                tmp.unlink(missing_ok=True)
        images = np.load(npy_path, mmap_mode="r")
        logger.info(
            "image cache built: %s (%d images at %d px, %d skipped)", npy_path, len(kept), size, len(skipped)
        )
        return CachedImages(
            catalog.subset(kept),
            images,
            size,
            npy_path,
            tuple(skipped),
            kept,
            tuple(hashes[i] for i in kept),
            reused=False,
        )


def make_private(cache_dir: Path) -> None:
    """The cache folder 0700 and its files 0600 (decoded patient images are the site's alone);
    only what this user owns is changed."""
    uid = os.getuid()
    if cache_dir.stat().st_uid == uid and cache_dir.stat().st_mode & 0o077:
        cache_dir.chmod(0o700)
    for path in cache_dir.iterdir():
        info = path.lstat()
        if path.is_file() and not path.is_symlink() and info.st_uid == uid and info.st_mode & 0o077:
            path.chmod(0o600)


@dataclass(frozen=True)
class ClearedCache:
    files: int
    nbytes: int


def clear_cache(cache_dir: Path, older_than_days: float | None = None) -> ClearedCache:
    """Remove cached images (``<key>.npy`` with its ``<key>.json``, and leftovers of interrupted
    builds) from ``cache_dir``; with ``older_than_days``, only caches decoded that long ago or
    longer. Other files are left alone."""
    import time

    if not cache_dir.is_dir():
        return ClearedCache(0, 0)
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400.0
    files = nbytes = 0
    for path in sorted(cache_dir.iterdir()):
        if not path.is_file() or not (path.suffix in (".npy", ".json") or path.name.endswith(".tmp")):
            continue
        info = path.stat()
        if cutoff is not None and info.st_mtime > cutoff:
            continue
        path.unlink(missing_ok=True)
        files += 1
        nbytes += info.st_size
    return ClearedCache(files, nbytes)


def build_cache(
    catalog: Catalog,
    image_size: int,
    cache_dir: Path | str | None = None,
    *,
    strict: bool = False,
    progress: ProgressCallback | None = None,
    workers: int = 2,
) -> CachedImages:
    """Decode and resize every image of ``catalog`` once, or reuse the cache built before.

    See the module docstring for the geometry, the key, atomicity and skipping rules.
    """
    return ImageCache(cache_dir, workers=workers).build(catalog, image_size, strict=strict, progress=progress)
