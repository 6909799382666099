"""``manifest``: the CSV ``path,label[,site,patient_id,view]`` of a hospital's own export.

The reader (the ``manifest`` source) and the writer (:func:`write_manifest`, used by partitions
and studies) live together so that what is written always reads back the same.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.catalog import Catalog, ImageRecord
from common.data.labels import MANIFEST_LABELS
from common.data.readers import FileReader
from common.data.sources.base import (
    SourceRequest,
    _build,
    _multiclass,
    _path,
    _register,
    _report_missing,
    multilabel_targets,
    read_csv_rows,
)
from common.errors import DataError

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("path", "label")


@_register(
    "manifest",
    "CSV path,label[,site,patient_id,view]; relative paths are resolved against the CSV's folder",
)
def _load_manifest(req: SourceRequest) -> Catalog:
    csv_path = _path(req)
    if csv_path.is_dir():
        raise DataError(
            f"{csv_path} is a folder; format 'manifest' expects a CSV file with columns path,label"
        )
    _, rows = read_csv_rows(csv_path, MANIFEST_COLUMNS)
    if not rows:
        raise DataError(f"{csv_path} has a header but no rows")
    root = csv_path.parent
    records: list[ImageRecord] = []
    missing: list[str] = []
    seen: dict[Path, tuple[int, tuple[str, ...]]] = {}
    repeated: list[int] = []
    for line, row in enumerate(rows, start=2):
        if not row["path"] or (not row["label"] and not req.task.is_multilabel):
            raise DataError(f"{csv_path} line {line}: empty 'path' or 'label'")
        image = Path(row["path"]).expanduser()
        absolute = image if image.is_absolute() else root / image
        if not absolute.is_file():
            missing.append(row["path"])
            continue
        labels = tuple(lbl.strip() for lbl in row["label"].split("|") if lbl.strip()) or ("No Finding",)
        identity = absolute.resolve()
        if identity in seen:
            first_line, first_labels = seen[identity]
            if sorted(first_labels) != sorted(labels):
                raise DataError(
                    f"{csv_path}: image {row['path']!r} is listed on line {first_line} as "
                    f"{'|'.join(first_labels)!r} and on line {line} as {'|'.join(labels)!r}; "
                    "keep one row with the right label"
                )
            repeated.append(line)
            continue
        seen[identity] = (line, labels)
        key = image.as_posix() if not image.is_absolute() else str(absolute)
        records.append(
            ImageRecord(
                req.source_id,
                key,
                labels,
                patient_id=row.get("patient_id") or None,
                site=row.get("site") or req.opt("site"),
                view=row.get("view") or None,
                meta={
                    k: v
                    for k, v in row.items()
                    if k not in {"path", "label", "site", "patient_id", "view"} and v
                },
            )
        )
    _report_missing(req, csv_path, missing)
    if repeated:
        logger.warning(
            "%s: %d row(s) repeat an earlier row's image and label and were left out (lines %s)",
            csv_path,
            len(repeated),
            ", ".join(map(str, repeated[:5])) + (" ..." if len(repeated) > 5 else ""),
        )
    reader = FileReader(root)
    if req.task.is_multilabel:
        positives = [[] if r.source_labels == ("No Finding",) else list(r.source_labels) for r in records]
        targets = multilabel_targets(
            positives,
            req.task.classes,
            req.task,
            origin=str(csv_path),
            drop_unmapped=req.opt_bool("drop_unmapped"),
        )
        return _build(req, records, targets, reader)
    table = req.label_table({**MANIFEST_LABELS, **{c: c for c in req.task.classes}})
    return _multiclass(req, records, table, str(csv_path), reader)


def manifest_label(catalog: Catalog, index: int) -> str:
    """The task label of one image as the manifest format reads it.

    Multi-class: the class name. Multi-label: positive findings joined by ``|``, or
    ``No Finding``; unknown (NaN) findings are written as negative, the manifest has no blank.
    """
    target = catalog.targets[index]
    if not catalog.task.is_multilabel:
        return catalog.task.classes[int(np.argmax(target))]
    positives = [name for name, v in zip(catalog.task.classes, target, strict=True) if v == 1]
    return "|".join(positives) or "No Finding"


MANIFEST_HEADER = "path,label,site,patient_id,view"


def manifest_row(catalog: Catalog, index: int, path: Path, site: str) -> str:
    record = catalog.records[index]
    label = manifest_label(catalog, index)
    return csv_row([str(path), label, site, record.patient_id or "", record.view or ""])


def write_manifest(path: Path, catalog: Catalog, indices: Sequence[int] | np.ndarray) -> Path:
    """Write the images ``indices`` of a file-based catalog as one manifest CSV (atomically).

    The manifest keeps each image's absolute path, task label, site, patient and view, so
    ``--source manifest`` reads back the same records (e.g. a held-out test set or a data pool).
    """
    rows = [MANIFEST_HEADER]
    for i in np.asarray(indices, dtype=np.int64).tolist():
        record = catalog.records[i]
        image = record_path(catalog, record)
        if image is None:
            raise DataError(
                f"image {record.key} of source '{record.source}' has no file, so it cannot go into a "
                "manifest; write a partition instead (it saves such images as PNG)"
            )
        rows.append(manifest_row(catalog, i, image, record.site or ""))
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def record_path(catalog: Catalog, record: ImageRecord) -> Path | None:
    """The absolute path of a file-based record's image, or None for sources without files."""
    reader = catalog.readers.get(record.source)
    path_of = getattr(reader, "path", None)
    if callable(path_of):
        found = path_of(record)
        if found is not None:
            return Path(found).resolve()
    if record.meta.get("path"):
        return Path(record.meta["path"]).resolve()
    return None


def csv_row(values: Sequence[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(values)
    return out.getvalue()
