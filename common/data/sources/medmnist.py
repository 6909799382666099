"""``medmnist``: MedMNIST chest sets (PneumoniaMNIST, ChestMNIST), the npz and an optional download.

An npz holds ``{train,val,test}_images`` (uint8, N x S x S, S in 28 / 64 / 128 / 224) and
``{train,val,test}_labels``. PneumoniaMNIST labels are 0 = normal, 1 = pneumonia (the Kermany
images); ChestMNIST labels are 14 binary findings in the NIH ChestX-ray14 order. MedMNIST
carries no patient ids, so every image is its own group when splitting (the release's own
split is kept in ``meta['split']``).

:func:`download_medmnist` fetches ``<flag>[_<size>].npz`` from the official Zenodo record and
checks its MD5 before moving it into place. The base URL can be overridden (argument or the
``CXR_FL_MEDMNIST_URL`` environment variable): tests serve a small npz from a loopback server.
MD5 sums are recorded here only for the 28 px files; for other sizes pass ``md5=`` (from the
MedMNIST record page), otherwise the download is refused rather than left unchecked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from common.data.catalog import Catalog, ImageRecord
from common.data.labels import multiclass_targets, require_multilabel
from common.data.readers import ArrayReader
from common.data.sources.base import SourceRequest, _register, multilabel_targets
from common.errors import ConfigError, DataError, IntegrityError
from common.tasks import NIH14_FINDINGS

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://zenodo.org/records/10519652/files"
BASE_URL_ENV = "CXR_FL_MEDMNIST_URL"
FLAGS: tuple[str, ...] = ("pneumoniamnist", "chestmnist")
SIZES: tuple[int, ...] = (28, 64, 128, 224)
SPLITS: tuple[str, ...] = ("train", "val", "test")
KNOWN_MD5: dict[tuple[str, int], str] = {
    ("pneumoniamnist", 28): "28209eda62fecd6e6a2d98b1501bb15f",
    ("chestmnist", 28): "02c8a6516a18b556561a56cbdd36c4a8",
}
PNEUMONIAMNIST_LABELS: dict[str, str | None] = {"0": "normal", "1": "pneumonia"}


def medmnist_filename(flag: str, size: int) -> str:
    if flag not in FLAGS:
        raise ConfigError("flag", flag, "one of " + ", ".join(FLAGS))
    if size not in SIZES:
        raise ConfigError("size", size, "one of " + ", ".join(map(str, SIZES)))
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_medmnist(
    flag: str,
    size: int,
    dest_dir: Path,
    *,
    base_url: str | None = None,
    md5: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download ``flag`` at ``size`` px into ``dest_dir`` (kept if already there and intact).

    Raises:
        IntegrityError: the file's MD5 differs from the expected one (the file is discarded).
        DataError: the server cannot be reached or answers with an error.
        ConfigError: no MD5 is known for this file and none was given.
    """
    name = medmnist_filename(flag, size)
    expected = md5 or KNOWN_MD5.get((flag, size))
    if expected is None:
        raise ConfigError(
            "md5", None, f"the MD5 of {name} from the MedMNIST record page (none is recorded here)"
        )
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / name
    if target.is_file() and md5sum(target) == expected:
        logger.info("%s already present and intact", target)
        return target
    base = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    url = f"{base}/{name}?download=1"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        actual = md5sum(tmp)
        if actual != expected:
            raise IntegrityError(
                f"{url}: MD5 {actual} does not match the expected {expected}; file discarded. "
                "Retry the download or check the md5 value"
            )
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"cannot download {url}: {exc}. Download {name} by hand into {dest_dir}") from None
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("downloaded %s (%s)", target, expected)
    return target


def _find_npz(path: Path, flag: str | None) -> Path:
    if path.is_file():
        return path
    candidates = sorted(p for p in path.glob("*.npz") if flag is None or p.name.startswith(flag))
    if not candidates:
        raise DataError(
            f"{path}: no MedMNIST .npz file (e.g. pneumoniamnist_64.npz); pass the file as --data"
        )
    if len(candidates) > 1:
        raise DataError(
            f"{path}: several npz files ({', '.join(p.name for p in candidates)}); pass one as --data"
        )
    return candidates[0]


@_register(
    "medmnist",
    "MedMNIST npz (pneumoniamnist / chestmnist, any size): {train,val,test}_{images,labels}",
    {"flag": "pneumoniamnist or chestmnist (default: from the file name)", "splits": "splits to include"},
)
def load_medmnist_catalog(req: SourceRequest) -> Catalog:
    """The ``medmnist`` source: one catalog record per image of the chosen release splits."""
    if req.path is None:
        raise DataError("format 'medmnist' needs a data path (--data PATH to an npz file)")
    flag_opt = req.opt("flag")
    npz_path = _find_npz(req.path, str(flag_opt) if flag_opt else None)
    flag = str(flag_opt) if flag_opt else next((f for f in FLAGS if npz_path.name.startswith(f)), None)
    if flag not in FLAGS:
        raise ConfigError(
            "flag", flag_opt or npz_path.name, "pneumoniamnist or chestmnist (set the 'flag' option)"
        )
    splits = req.opt_list("splits", list(SPLITS)) or list(SPLITS)
    try:
        with np.load(npz_path) as npz:
            files = set(npz.files)
            needed = [f"{s}_{kind}" for s in splits for kind in ("images", "labels")]
            missing = [n for n in needed if n not in files]
            if missing:
                raise DataError(
                    f"{npz_path}: missing arrays {', '.join(missing)}; found {', '.join(sorted(files))}"
                )
            images = {s: np.asarray(npz[f"{s}_images"]) for s in splits}
            labels = {s: np.asarray(npz[f"{s}_labels"]) for s in splits}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {npz_path}: {exc}") from None
    st = npz_path.stat()
    reader = ArrayReader(images, f"{npz_path}:{st.st_size}:{st.st_mtime_ns}")
    records: list[ImageRecord] = []
    for split in splits:
        lab = labels[split].reshape(len(labels[split]), -1)
        if len(lab) != len(images[split]):
            raise DataError(f"{npz_path}: {split}_images and {split}_labels differ in length")
        for i in range(len(lab)):
            src: tuple[str, ...]
            if flag == "pneumoniamnist":
                src = (str(int(lab[i, 0])),)
            else:
                src = tuple(NIH14_FINDINGS[j] for j in np.flatnonzero(lab[i])) or ("No Finding",)
            records.append(
                ImageRecord(req.source_id, f"{split}/{i}", src, site=req.opt("site"), meta={"split": split})
            )
    if flag == "pneumoniamnist":
        targets, keep = multiclass_targets(
            [r.source_labels[0] for r in records],
            req.label_table(PNEUMONIAMNIST_LABELS),
            req.task,
            source=req.fmt,
            drop_unmapped=req.opt_bool("drop_unmapped"),
            origin=str(npz_path),
        )
        records = [records[i] for i in keep]
    else:
        require_multilabel(req.task, req.fmt, str(npz_path))
        positives = [[] if r.source_labels == ("No Finding",) else list(r.source_labels) for r in records]
        targets = multilabel_targets(
            positives, NIH14_FINDINGS, req.task, origin=str(npz_path), drop_unmapped=False
        )
    return Catalog(req.task, records, targets, {req.source_id: reader})
