"""``chexpert``: CheXpert-style CSV (``Path`` + findings 1 / 0 / -1 / blank)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np

from common.data.catalog import Catalog, ImageRecord
from common.data.labels import finding_index, require_multilabel, resolve_finding
from common.data.readers import FileReader
from common.data.sources.base import SourceRequest, _build, _path, _register, read_csv_rows
from common.errors import ConfigError, DataError

CHEXPERT_FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
UNCERTAINTY_POLICIES = ("ones", "zeros", "ignore")
_CHEXPERT_PATIENT = re.compile(r"(patient\d+)")

logger = logging.getLogger(__name__)


@_register(
    "chexpert",
    "CheXpert-style CSV: Path + findings 1 / 0 / -1 (uncertain) / blank (not mentioned)",
    {
        "uncertainty": "how -1 is read: ones | zeros | ignore (NaN); default ignore",
        "blank": "how a blank cell is read: zeros | ignore (NaN); default zeros",
        "frontal_only": "keep only Frontal images (default true)",
    },
)
def _load_chexpert(req: SourceRequest) -> Catalog:
    path = _path(req)
    if path.is_dir():
        csv_path = next((path / n for n in ("train.csv", "valid.csv") if (path / n).is_file()), None)
        if csv_path is None:
            raise DataError(f"{path}: no train.csv or valid.csv; pass the CheXpert CSV file as --data")
    else:
        csv_path = path
    require_multilabel(req.task, req.fmt, str(csv_path))
    policy = str(req.opt("uncertainty", "ignore"))
    if policy not in UNCERTAINTY_POLICIES:
        raise ConfigError("uncertainty", policy, "one of " + ", ".join(UNCERTAINTY_POLICIES))
    blank = str(req.opt("blank", "zeros"))
    if blank not in ("zeros", "ignore"):
        raise ConfigError("blank", blank, "zeros or ignore")
    header, rows = read_csv_rows(csv_path, ["Path"])
    index = finding_index(req.task)
    columns = [(c, resolve_finding(c, index)) for c in header if c in CHEXPERT_FINDINGS]
    task_cols = {col for _, col in columns if col is not None}
    absent = [req.task.classes[i] for i in range(req.task.num_classes) if i not in task_cols]
    if len(absent) == req.task.num_classes:
        raise DataError(
            f"{csv_path}: none of the task's findings ({', '.join(req.task.classes)}) is a column"
        )
    if absent:
        logger.warning("%s: no column for %s; those findings are NaN (unknown)", csv_path, ", ".join(absent))
    frontal_only = req.opt_bool("frontal_only", True) and "Frontal/Lateral" in header
    root = _chexpert_root(csv_path, rows)
    value_of = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0}
    uncertain_value = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}[policy]
    blank_value = 0.0 if blank == "zeros" else math.nan
    records: list[ImageRecord] = []
    target_rows: list[np.ndarray] = []
    for line, row in enumerate(rows, start=2):
        if frontal_only and row["Frontal/Lateral"] != "Frontal":
            continue
        vec = np.full(req.task.num_classes, np.nan, dtype=np.float32)
        found: list[str] = []
        for name, col in columns:
            cell = row[name]
            if cell in ("-1", "-1.0"):
                value = uncertain_value
            elif cell == "":
                value = blank_value
            elif cell in value_of:
                value = value_of[cell]
            else:
                raise DataError(
                    f"{csv_path} line {line}: column '{name}' has {cell!r}; expected 1, 0, -1 or blank"
                )
            if value == 1.0 and name != "No Finding":
                found.append(name)
            if col is not None:
                vec[col] = value
        m = _CHEXPERT_PATIENT.search(row["Path"])
        records.append(
            ImageRecord(
                req.source_id,
                Path(row["Path"]).as_posix(),
                tuple(found) if found else ("No Finding",),
                patient_id=m.group(1) if m else None,
                site=req.opt("site"),
                view=row.get("AP/PA") or row.get("Frontal/Lateral") or None,
            )
        )
        target_rows.append(vec)
    targets = np.stack(target_rows) if target_rows else np.zeros((0, req.task.num_classes), np.float32)
    return _build(req, records, targets, FileReader(root))


def _chexpert_root(csv_path: Path, rows: list[dict[str, str]]) -> Path:
    """The folder the CSV's ``Path`` values are relative to (its folder or one above it)."""
    if not rows:
        return csv_path.parent
    first = rows[0]["Path"]
    for root in (csv_path.parent, csv_path.parent.parent):
        if (root / first).is_file():
            return root
    raise DataError(f"{csv_path}: image {first!r} (first row) not found next to the CSV or one folder up")
