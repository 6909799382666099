"""``nih14``: NIH ChestX-ray14, ``Data_Entry_2017*.csv`` + ``images/`` (multi-label)."""

from __future__ import annotations

from pathlib import Path

from common.data.catalog import Catalog, ImageRecord
from common.data.labels import require_multilabel
from common.data.readers import FileReader
from common.data.sources.base import (
    SourceRequest,
    _build,
    _is_image,
    _path,
    _register,
    _report_missing,
    multilabel_targets,
    read_csv_rows,
)
from common.errors import DataError
from common.tasks import NIH14_FINDINGS

NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")


def _nih_image_index(root: Path) -> dict[str, str]:
    folders = [root / "images", *sorted(root.glob("images_*/images")), *sorted(root.glob("images_*"))]
    index: dict[str, str] = {}
    for folder in folders:
        if folder.is_dir():
            for p in folder.iterdir():
                if _is_image(p):
                    index.setdefault(p.name, p.relative_to(root).as_posix())
    return index


@_register(
    "nih14",
    "NIH ChestX-ray14: Data_Entry_2017*.csv + images/ (14 findings, multi-label)",
    {"views": "View Position values to keep, e.g. 'PA' (default: all)"},
)
def _load_nih14(req: SourceRequest) -> Catalog:
    root = _path(req)
    if root.is_file():
        csv_path, root = root, root.parent
    else:
        candidates = sorted(root.glob("Data_Entry_2017*.csv"))
        if not candidates:
            raise DataError(
                f"{root}: no Data_Entry_2017*.csv label file; format 'nih14' needs it beside images/"
            )
        csv_path = candidates[-1]
    require_multilabel(req.task, req.fmt, str(csv_path))
    _, rows = read_csv_rows(csv_path, NIH_COLUMNS)
    images = _nih_image_index(root)
    if not images:
        raise DataError(
            f"{root}: no images/ folder with images (expected {root}/images/00000001_000.png ...)"
        )
    views = req.opt_list("views", None)
    records: list[ImageRecord] = []
    positives: list[list[str]] = []
    missing: list[str] = []
    for row in rows:
        if views is not None and row["View Position"] not in views:
            continue
        rel = images.get(row["Image Index"])
        if rel is None:
            missing.append(row["Image Index"])
            continue
        found = [
            f.strip() for f in row["Finding Labels"].split("|") if f.strip() and f.strip() != "No Finding"
        ]
        positives.append(found)
        meta = {
            k: row[c]
            for k, c in (("age", "Patient Age"), ("sex", "Patient Gender"), ("follow_up", "Follow-up #"))
            if row.get(c)
        }
        records.append(
            ImageRecord(
                req.source_id,
                rel,
                tuple(found) if found else ("No Finding",),
                patient_id=row["Patient ID"] or None,
                site=req.opt("site"),
                view=row["View Position"] or None,
                meta=meta,
            )
        )
    if missing and len(missing) < len(rows):
        # The full release is often downloaded in parts; rows of absent parts are expected.
        _report_missing(req, csv_path, missing)
    elif missing:
        raise DataError(f"{csv_path}: none of the {len(rows)} listed images is under {root}/images")
    targets = multilabel_targets(
        positives, NIH14_FINDINGS, req.task, origin=str(csv_path), drop_unmapped=req.opt_bool("drop_unmapped")
    )
    return _build(req, records, targets, FileReader(root))
