"""The ``dicom`` source: a DICOM folder and its labels.csv turned into a Catalog.

Reading, selection and the pixel pipeline live in :mod:`common.data.dicom`; this adapter
lists the folder, joins it with labels.csv, pseudonymises patients and counts what it leaves
out (see that module's docstring for the layout and the privacy rules).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from common.data.catalog import Catalog, ImageRecord
from common.data.dicom import (
    DEFAULT_BODY_PARTS,
    DEFAULT_MODALITIES,
    DICOM_DESCRIPTION,
    DICOM_OPTIONS,
    LABELS_FILE,
    DicomObject,
    Selection,
    decode_dicom_file,
    find_dicom_files,
    inspect_dicom,
)
from common.data.labels import MANIFEST_LABELS, finding_index, multiclass_targets, resolve_finding
from common.data.readers import FileReader
from common.data.sources.base import SourceRequest, _register, multilabel_targets, read_csv_rows
from common.errors import DataError

logger = logging.getLogger(__name__)


class DicomReader(FileReader):
    """Reads records whose ``key`` is a DICOM file's path relative to ``root``."""

    def read(self, record: ImageRecord) -> np.ndarray:
        return decode_dicom_file(self.path(record))


@_register("dicom", DICOM_DESCRIPTION, DICOM_OPTIONS)
def _load_dicom(req: SourceRequest) -> Catalog:
    return load_dicom_catalog(req)


def _pseudonymiser(raw_ids: set[str], labels_bytes: bytes) -> Mapping[str, str]:
    """Raw patient id -> pseudonym, keyed by data only the site holds (module docstring)."""
    key = hashlib.sha256(b"cxr-fl dicom patient pseudonym v1\0" + labels_bytes)
    for raw in sorted(raw_ids):
        key.update(raw.encode("utf-8", "surrogatepass") + b"\0")
    secret = key.digest()
    return {
        raw: "pt-" + hmac.new(secret, raw.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:20]
        for raw in raw_ids
    }


def _label_rows(
    req: SourceRequest, root: Path
) -> tuple[Path, list[str], dict[str, tuple[int, dict[str, str]]]]:
    labels_path = root / LABELS_FILE
    if not labels_path.is_file():
        raise DataError(
            f"{root}: no {LABELS_FILE}; format 'dicom' needs one with columns path,label "
            "(path relative to the folder)"
        )
    required = ["path"] if req.task.is_multilabel else ["path", "label"]
    header, rows = read_csv_rows(labels_path, required)
    if not rows:
        raise DataError(f"{labels_path} has a header but no rows")
    by_path: dict[str, tuple[int, dict[str, str]]] = {}
    for line, row in enumerate(rows, start=2):
        if not row["path"]:
            raise DataError(f"{labels_path} line {line}: empty 'path'")
        rel = Path(row["path"]).as_posix()
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise DataError(
                f"{labels_path} line {line}: path {row['path']!r} must be relative to {root} "
                "and stay inside it"
            )
        if rel in by_path:
            raise DataError(
                f"{labels_path} line {line}: {row['path']!r} is listed twice "
                f"(first on line {by_path[rel][0]})"
            )
        by_path[rel] = (line, row)
    return labels_path, header, by_path


def _selection(req: SourceRequest) -> Selection:
    """Which DICOM objects the site keeps: the ``modalities``, ``body-parts`` and ``views`` options
    (upper-cased defined terms; the defaults of common/data/dicom.py; no ``views``: all)."""

    def terms(name: str, default: tuple[str, ...] | None) -> frozenset[str] | None:
        values = req.opt_list(name, default)
        return frozenset(v.upper() for v in values) if values else None

    return Selection(
        terms("modalities", DEFAULT_MODALITIES) or frozenset(DEFAULT_MODALITIES),
        terms("body_parts", DEFAULT_BODY_PARTS) or frozenset(DEFAULT_BODY_PARTS),
        terms("views", None),
    )


def _select_listed(
    req: SourceRequest,
    root: Path,
    files: list[Path],
    rows: dict[str, tuple[int, dict[str, str]]],
    labels_path: Path,
    selection: Selection,
) -> tuple[list[tuple[str, DicomObject, dict[str, str]]], Counter[str]]:
    """The DICOM files that pass ``selection`` and have a row in the labels file, with their
    rows; and how many were left out, by reason (unreadable files refused in strict mode)."""
    left_out: Counter[str] = Counter()
    kept: list[tuple[str, DicomObject, dict[str, str]]] = []
    seen: set[str] = set()
    for path in files:
        rel = path.relative_to(root).as_posix()
        seen.add(rel)
        obj, reason = inspect_dicom(path, selection)
        if obj is None:
            if req.strict and reason.startswith("unreadable"):
                raise DataError(f"{path}: {reason} (strict mode: no file may be unreadable)")
            left_out[reason] += 1
            continue
        listed = rows.get(rel)
        if listed is None:
            left_out[f"no row in {LABELS_FILE}"] += 1
            continue
        kept.append((rel, obj, listed[1]))
    not_dicom = [rel for rel in rows if rel not in seen and (root / rel).is_file()]
    missing = [rel for rel in rows if rel not in seen and not (root / rel).is_file()]
    if not_dicom:
        left_out["listed file is not DICOM"] += len(not_dicom)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        if req.strict:
            raise DataError(
                f"{labels_path}: {len(missing)} listed file(s) not found: {shown}. "
                "Restore them or run without --strict"
            )
        logger.warning("%s: %d listed file(s) not found and left out: %s", labels_path, len(missing), shown)
        left_out["listed file missing"] += len(missing)
    return kept, left_out


def _pseudonymised_records(
    req: SourceRequest, kept: list[tuple[str, DicomObject, dict[str, str]]], labels_path: Path
) -> list[ImageRecord]:
    """One record per kept file; patient ids replaced by pseudonyms keyed to the labels file."""
    raw_ids = {(row.get("patient") or obj.patient or "") for _, obj, row in kept} - {""}
    pseudonym = _pseudonymiser(raw_ids, labels_path.read_bytes())
    records = []
    for rel, obj, row in kept:
        raw = row.get("patient") or obj.patient
        label = row.get("label", "")
        records.append(
            ImageRecord(
                req.source_id,
                rel,
                tuple(x.strip() for x in label.split("|") if x.strip()) or ("No Finding",),
                patient_id=pseudonym[raw] if raw else None,
                site=req.opt("site"),
                view=obj.view,
                meta={"modality": obj.modality},
            )
        )
    return records


def load_dicom_catalog(req: SourceRequest) -> Catalog:
    """The ``dicom`` source: select, label and pseudonymise a DICOM folder (no pixel decoded)."""
    root = req.path
    if root is None or not root.is_dir():
        raise DataError(
            f"{root} is not a folder; format 'dicom' expects a folder of DICOM files and a labels.csv"
        )
    selection = _selection(req)
    labels_path, header, rows = _label_rows(req, root)
    files = find_dicom_files(root)
    if not files:
        raise DataError(f"{root}: no DICOM files (*.dcm, or files with the DICM preamble) at any depth")
    kept, left_out = _select_listed(req, root, files, rows, labels_path, selection)
    if left_out:
        logger.info(
            "%s: %d DICOM files kept, left out: %s",
            req.source_id,
            len(kept),
            "; ".join(f"{reason} {n}" for reason, n in sorted(left_out.items())),
        )
    if not kept:
        reasons = "; ".join(f"{reason}: {n}" for reason, n in sorted(left_out.items()))
        raise DataError(
            f"{root}: no DICOM image left for task '{req.task.name}' ({reasons}). "
            "Check labels.csv and the modalities / body-parts / views options"
        )
    records = _pseudonymised_records(req, kept, labels_path)
    reader = DicomReader(root)
    task = req.task
    if task.is_multilabel:
        targets = _multilabel_targets(req, labels_path, header, [row for _, _, row in kept], records)
        return Catalog(task, records, targets, {req.source_id: reader}, left_out=dict(left_out))
    table = req.label_table({**MANIFEST_LABELS, **{c: c for c in task.classes}})
    targets, keep = multiclass_targets(
        [r.source_labels[0] for r in records],
        table,
        task,
        source=req.fmt,
        drop_unmapped=req.opt_bool("drop_unmapped"),
        origin=str(labels_path),
    )
    dropped = len(records) - len(keep)
    if dropped:
        left_out["label outside the task (drop-unmapped)"] += dropped
    return Catalog(
        task,
        [records[i] for i in keep],
        targets.astype(np.float32),
        {req.source_id: reader},
        left_out=dict(left_out),
    )


def _multilabel_targets(
    req: SourceRequest,
    labels_path: Path,
    header: list[str],
    rows: list[dict[str, str]],
    records: list[ImageRecord],
) -> np.ndarray:
    """Per-finding columns (1 / 0 / blank or -1 = unknown), else ``label`` as in a manifest."""
    task = req.task
    index = finding_index(task)
    columns = [(name, col) for name in header if (col := resolve_finding(name, index)) is not None]
    if not columns:
        if "label" not in header:
            raise DataError(
                f"{labels_path}: no 'label' column and no column named after a finding of task "
                f"'{task.name}' ({', '.join(task.classes)})"
            )
        positives = [[] if r.source_labels == ("No Finding",) else list(r.source_labels) for r in records]
        return multilabel_targets(
            positives,
            task.classes,
            task,
            origin=str(labels_path),
            drop_unmapped=req.opt_bool("drop_unmapped"),
        )
    targets = np.full((len(rows), task.num_classes), np.nan, dtype=np.float32)
    values = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": np.nan, "-1": np.nan, "-1.0": np.nan}
    for i, row in enumerate(rows):
        for name, col in columns:
            cell = row.get(name, "")
            if cell not in values:
                raise DataError(
                    f"{labels_path}: column '{name}' has {cell!r} for {row['path']!r}; "
                    "expected 1, 0, -1 or blank"
                )
            targets[i, col] = values[cell]
    return targets
