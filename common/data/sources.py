"""Source adapters: each public CXR set, in its publisher's layout, turned into a Catalog.

One adapter per format, registered in :data:`SOURCES` under the names that ``cxr-fl-client
--format`` and ``python -m simulation --source`` accept:

=======================  ==================================================================
``image-folder``         one subfolder per class, optionally under split folders
                         (Kermany ``chest_xray/{train,test}/{NORMAL,PNEUMONIA}``)
``covid19-radiography``  ``<class>/images/`` + ``<class>.metadata.csv`` or ``.xlsx``
``ieee8023``             ``metadata.csv`` + ``images/`` (covid-chestxray-dataset)
``nih14``                ``Data_Entry_2017*.csv`` + ``images/`` (ChestX-ray14)
``chexpert``             CheXpert-style CSV (``Path`` + findings 1 / 0 / -1 / blank)
``medmnist``             ``pneumoniamnist*.npz`` / ``chestmnist*.npz``
``manifest``             CSV ``path,label[,site,patient_id,view]`` (a hospital's own export)
``dicom``                DICOM files at any depth + ``labels.csv`` (:mod:`common.data.dicom`)
``synthetic``            procedural CXR-like images, no files (smoke tests; not medical)
=======================  ==================================================================

:func:`load_catalog` checks the layout (folders, CSV columns, labels) and builds the records
and label vectors *without decoding any image*; unreadable images are found when the cache is
built (:mod:`common.data.cache`) or by ``cxr-fl-client check``.

Options (``options=`` mapping; keys accept ``-`` or ``_``) understood by every file-based
source: ``drop-unmapped`` (leave out images whose label the task does not cover, instead of
the default error), ``label-map`` (``"SRC=class,..."`` added to the source's table, see
:mod:`common.data.labels`), ``site`` (a site name for records that carry none). Source-specific
options are listed in each adapter's :class:`SourceSpec`. An unknown option is an error.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.catalog import Catalog, ImageRecord
from common.data.dicom import DICOM_DESCRIPTION, DICOM_OPTIONS, load_dicom_catalog
from common.data.labels import (
    COVID19_RADIOGRAPHY_LABELS,
    IMAGE_FOLDER_LABELS,
    MANIFEST_LABELS,
    finding_index,
    ieee8023_label,
    multiclass_targets,
    parse_label_map,
    require_multilabel,
    resolve_finding,
)
from common.data.readers import IMAGE_SUFFIXES, FileReader
from common.data.synthetic import SYNTHETIC_CLASSES, SyntheticReader
from common.errors import ConfigError, DataError
from common.registry import Registry
from common.tasks import NIH14_FINDINGS, Task

logger = logging.getLogger(__name__)

Loader = Callable[["SourceRequest"], Catalog]

COMMON_OPTIONS: dict[str, str] = {
    "drop_unmapped": "leave out images whose label the task does not cover (default: error)",
    "label_map": "extra SOURCE=class pairs, comma-separated",
    "site": "site name for records that carry none",
}


@dataclass(frozen=True)
class SourceSpec:
    """A registered source format: its loader, its options and whether it needs a path."""

    loader: Loader
    description: str
    options: Mapping[str, str] = field(default_factory=dict)
    needs_path: bool = True


@dataclass(frozen=True)
class SourceRequest:
    """Everything a loader gets: the validated path, task, source id, options and strictness."""

    fmt: str
    path: Path | None
    task: Task
    source_id: str
    options: Mapping[str, Any]
    strict: bool

    def opt(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)

    def opt_bool(self, name: str, default: bool = False) -> bool:
        value = self.options.get(name, default)
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(_dash(name), value, "true or false")

    def opt_int(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.options.get(name, default)
        try:
            number = int(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
        except (TypeError, ValueError):
            raise ConfigError(_dash(name), value, f"an integer >= {minimum}") from None
        if number < minimum:
            raise ConfigError(_dash(name), value, f"an integer >= {minimum}")
        return number

    def opt_list(self, name: str, default: Sequence[str] | None) -> list[str] | None:
        value = self.options.get(name)
        if value is None or value == "":
            return list(default) if default is not None else None
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return [str(v) for v in value]

    def label_table(self, base: Mapping[str, str | None]) -> dict[str, str | None]:
        table = dict(base)
        table.update(parse_label_map(self.opt("label_map"), "label-map"))
        return table


SOURCES: Registry[SourceSpec] = Registry("data source format")


def _dash(name: str) -> str:
    return name.replace("_", "-")


def _register(
    name: str, description: str, options: Mapping[str, str] | None = None, *, needs_path: bool = True
):
    def decorator(fn: Loader) -> Loader:
        SOURCES.add(name, SourceSpec(fn, description, dict(options or {}), needs_path))
        return fn

    return decorator


def load_catalog(
    fmt: str,
    path: Path | str | None,
    task: Task,
    *,
    name: str | None = None,
    options: Mapping[str, object] | None = None,
    strict: bool = False,
) -> Catalog:
    """Read a source's layout and labels into a :class:`Catalog` (no image is decoded).

    Args:
        fmt: a registered format name (see :data:`SOURCES`).
        path: the data set's folder or file; None only for ``synthetic``.
        task: the task whose classes the labels are mapped onto.
        name: distinguishes several sources of one format (record.source = ``fmt:name``).
        options: source options (see the module docstring and ``SOURCES.get(fmt).options``).
        strict: turn tolerated inconsistencies (rows whose image file is missing) into errors.

    Raises:
        UnknownNameError: unknown format. ConfigError: unknown or bad option.
        DataError: missing folder/file, empty class, CSV without needed columns, unmapped labels.
    """
    spec = SOURCES.get(fmt)
    opts = {str(k).replace("-", "_"): v for k, v in (options or {}).items()}
    allowed = {**COMMON_OPTIONS, **spec.options} if spec.needs_path else dict(spec.options)
    for key in opts:
        if key not in allowed:
            raise ConfigError(
                f"option '{_dash(key)}' of format '{fmt}'",
                opts[key],
                "one of " + ", ".join(map(_dash, sorted(allowed))),
            )
    resolved: Path | None = None
    if spec.needs_path:
        if path is None or str(path) == "":
            raise DataError(f"format '{fmt}' needs a data path (--data PATH)")
        resolved = Path(path).expanduser()
        if not resolved.exists():
            raise DataError(f"data path {resolved} does not exist; check --data (format '{fmt}')")
    elif path is not None and str(path) != "":
        resolved = Path(path).expanduser()
    source_id = fmt if name is None else f"{fmt}:{name}"
    catalog = spec.loader(SourceRequest(fmt, resolved, task, source_id, opts, strict))
    if len(catalog) == 0:
        raise DataError(
            f"{resolved if resolved is not None else fmt}: no images left for task '{task.name}' "
            f"(format '{fmt}')"
        )
    logger.info("%s: %d images from %s; %s", source_id, len(catalog), resolved, catalog.class_counts())
    return catalog


# ----------------------------------------------------------------------------- helpers


def _path(req: SourceRequest) -> Path:
    if req.path is None:
        raise DataError(f"format '{req.fmt}' needs a data path (--data PATH)")
    return req.path


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def read_csv_rows(path: Path, required: Iterable[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Rows of a CSV (or .xlsx) as dicts; DataError naming the file and any missing columns."""
    if not path.is_file():
        raise DataError(f"file {path} does not exist")
    if path.suffix.lower() == ".xlsx":
        header, rows = _read_xlsx(path)
    else:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"found {', '.join(map(repr, header))}. "
            "Fix the header row or choose the right --format"
        )
    return header, rows


def _read_xlsx(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    from openpyxl import load_workbook

    try:
        wb = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises several unrelated types for broken files
        raise DataError(f"cannot read spreadsheet {path}: {exc}") from None
    sheet = wb.worksheets[0]
    values = list(sheet.iter_rows(values_only=True))
    wb.close()
    if not values:
        return [], []
    header = [str(h).strip() if h is not None else "" for h in values[0]]
    rows = [
        {h: ("" if v is None else str(v).strip()) for h, v in zip(header, row, strict=False)}
        for row in values[1:]
        if any(v is not None for v in row)
    ]
    return header, rows


def _build(
    req: SourceRequest,
    records: list[ImageRecord],
    targets: np.ndarray,
    reader: Any,
) -> Catalog:
    return Catalog(req.task, records, targets.astype(np.float32), {req.source_id: reader})


def _multiclass(
    req: SourceRequest,
    records: list[ImageRecord],
    table: Mapping[str, str | None],
    origin: str,
    reader: Any,
) -> Catalog:
    labels = [r.source_labels[0] for r in records]
    targets, keep = multiclass_targets(
        labels, table, req.task, source=req.fmt, drop_unmapped=req.opt_bool("drop_unmapped"), origin=origin
    )
    return _build(req, [records[i] for i in keep], targets, reader)


def _report_missing(req: SourceRequest, origin: Path, missing: list[str]) -> None:
    if not missing:
        return
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    if req.strict:
        raise DataError(
            f"{origin}: {len(missing)} listed image(s) not found: {shown}. "
            "Restore them or run without --strict"
        )
    logger.warning("%s: %d listed image(s) not found and left out: %s", origin, len(missing), shown)


# ----------------------------------------------------------------------------- image folder

SPLIT_NAMES = ("train", "val", "test")
_KERMANY_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_KERMANY_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


def kermany_patient(filename: str) -> tuple[str | None, str | None]:
    """Patient id and pneumonia subtype from a Kermany file name.

    ``person1_bacteria_1.jpeg`` -> (``person1``, ``bacteria``); ``IM-0115-0001.jpeg`` ->
    (``IM-0115``, None); ``NORMAL2-IM-1018-0001.jpeg`` -> (``NORMAL2-IM-1018``, None).
    """
    m = _KERMANY_PERSON.match(filename)
    if m:
        return m.group(1), m.group(2).lower()
    m = _KERMANY_IM.match(filename)
    if m:
        return m.group(1), None
    return None, None


@_register(
    "image-folder",
    "one subfolder per class (optionally under train/val/test); Kermany names give patient ids",
    {"splits": "release splits to include, e.g. 'train' (default: all present)"},
)
def _load_image_folder(req: SourceRequest) -> Catalog:
    root = _path(req)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; format 'image-folder' expects class subfolders")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise DataError(f"{root} has no class subfolders (expected e.g. {root}/NORMAL and {root}/PNEUMONIA)")
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_NAMES]
    if split_dirs and len(split_dirs) == len(subdirs):
        wanted = req.opt_list("splits", None)
        if wanted is not None:
            unknown = sorted(set(wanted) - {d.name for d in split_dirs})
            if unknown:
                raise ConfigError(
                    "splits",
                    ",".join(wanted),
                    "split folders present in " + str(root) + ": " + ", ".join(d.name for d in split_dirs),
                )
            split_dirs = [d for d in split_dirs if d.name in wanted]
        groups = [(d.name, d) for d in split_dirs]
    else:
        groups = [("", root)]
    site = req.opt("site")
    records: list[ImageRecord] = []
    for split, folder in groups:
        classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"{folder} has no class subfolders")
        for cls_dir in classes:
            images = _list_images(cls_dir)
            if not images:
                raise DataError(
                    f"class folder {cls_dir} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                    "add images or remove the empty folder"
                )
            for img in images:
                patient, subtype = kermany_patient(img.name)
                meta = {"class_folder": cls_dir.name}
                if split:
                    meta["split"] = split
                if subtype:
                    meta["subtype"] = subtype
                records.append(
                    ImageRecord(
                        req.source_id,
                        img.relative_to(root).as_posix(),
                        (cls_dir.name,),
                        patient_id=patient,
                        site=site,
                        meta=meta,
                    )
                )
    return _multiclass(req, records, req.label_table(IMAGE_FOLDER_LABELS), str(root), FileReader(root))


# ----------------------------------------------------------------------------- COVID-19 Radiography


@_register(
    "covid19-radiography",
    "COVID-19 Radiography Database: <class>/images/ + <class>.metadata.csv|.xlsx (URL = site)",
    {"classes": "class folders to include (default: all present)"},
)
def _load_covid19_radiography(req: SourceRequest) -> Catalog:
    root = _path(req)
    if not root.is_dir():
        raise DataError(
            f"{root} is not a folder; format 'covid19-radiography' expects <class>/images/ folders"
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "images").is_dir())
    if not class_dirs:
        raise DataError(
            f"{root} has no <class>/images/ folders "
            f"(expected e.g. {root}/COVID/images and {root}/Normal/images)"
        )
    wanted = req.opt_list("classes", None)
    if wanted is not None:
        unknown = sorted(set(wanted) - {d.name for d in class_dirs})
        if unknown:
            raise ConfigError(
                "classes",
                ",".join(wanted),
                "class folders in " + str(root) + ": " + ", ".join(d.name for d in class_dirs),
            )
        class_dirs = [d for d in class_dirs if d.name in wanted]
    records: list[ImageRecord] = []
    default_site = req.opt("site")
    for cls_dir in class_dirs:
        images = _list_images(cls_dir / "images")
        if not images:
            raise DataError(f"class folder {cls_dir / 'images'} has no images")
        meta_file = next(
            (
                root / f"{cls_dir.name}.metadata{ext}"
                for ext in (".csv", ".xlsx")
                if (root / f"{cls_dir.name}.metadata{ext}").is_file()
            ),
            None,
        )
        urls: dict[str, str] = {}
        if meta_file is None:
            logger.warning(
                "%s: no %s.metadata.csv/.xlsx; images get no source URL (site)", root, cls_dir.name
            )
        else:
            _, rows = read_csv_rows(meta_file, ["FILE NAME", "URL"])
            urls = {Path(r["FILE NAME"]).stem.lower(): r["URL"] for r in rows if r["FILE NAME"]}
        unlisted = 0
        for img in images:
            url = urls.get(img.stem.lower())
            if url is None:
                unlisted += 1
            records.append(
                ImageRecord(
                    req.source_id,
                    img.relative_to(root).as_posix(),
                    (cls_dir.name,),
                    site=url or default_site,
                    meta={"url": url} if url else {},
                )
            )
        if meta_file is not None and unlisted:
            logger.warning("%s: %d images have no row in %s (no site)", cls_dir, unlisted, meta_file.name)
    return _multiclass(req, records, req.label_table(COVID19_RADIOGRAPHY_LABELS), str(root), FileReader(root))


# ----------------------------------------------------------------------------- ieee8023

IEEE8023_COLUMNS = ("finding", "view", "modality", "location", "patientid", "filename", "folder")


@_register(
    "ieee8023",
    "ieee8023 covid-chestxray-dataset: metadata.csv + images/ (X-ray only, chosen views)",
    {"views": "views to keep, comma-separated (default 'PA,AP,AP Supine')"},
)
def _load_ieee8023(req: SourceRequest) -> Catalog:
    root = _path(req)
    csv_path = root / "metadata.csv" if root.is_dir() else root
    root = csv_path.parent
    _, rows = read_csv_rows(csv_path, IEEE8023_COLUMNS)
    views = set(req.opt_list("views", ["PA", "AP", "AP Supine"]) or [])
    user_map = parse_label_map(req.opt("label_map"), "label-map")
    records: list[ImageRecord] = []
    canonical: list[str | None] = []
    missing: list[str] = []
    for row in rows:
        if row["modality"] != "X-ray" or row["view"] not in views:
            continue
        rel = Path(row["folder"] or "images") / row["filename"]
        if not (root / rel).is_file():
            missing.append(rel.as_posix())
            continue
        finding = row["finding"]
        canonical.append(user_map[finding] if finding in user_map else ieee8023_label(finding))
        records.append(
            ImageRecord(
                req.source_id,
                rel.as_posix(),
                (finding,),
                patient_id=row["patientid"] or None,
                site=row["location"] or req.opt("site"),
                view=row["view"] or None,
                meta={"finding": finding},
            )
        )
    _report_missing(req, csv_path, missing)
    if not records:
        raise DataError(f"{csv_path}: no X-ray rows with views {sorted(views)}; check the 'views' option")
    targets, keep = multiclass_targets(
        [r.source_labels[0] for r in records],
        None,
        req.task,
        source=req.fmt,
        drop_unmapped=req.opt_bool("drop_unmapped"),
        origin=str(csv_path),
        canonical=canonical,
    )
    return _build(req, [records[i] for i in keep], targets, FileReader(root))


# ----------------------------------------------------------------------------- multi-label helpers


def multilabel_targets(
    positives: Sequence[Sequence[str]],
    vocabulary: Sequence[str],
    task: Task,
    *,
    origin: str,
    drop_unmapped: bool,
    negatives_known: bool = True,
) -> np.ndarray:
    """1 / 0 / NaN targets from each image's positive findings.

    A task finding in the source's ``vocabulary`` is 1 when listed, else 0 (when
    ``negatives_known``); a task finding outside the vocabulary is NaN (never reported).
    Positive names outside the vocabulary are an error unless ``drop_unmapped`` (then ignored).
    """
    index = finding_index(task)
    vocab_cols = {c for c in (resolve_finding(v, index) for v in vocabulary) if c is not None}
    vocab_lower = {v.lower() for v in vocabulary}
    targets = np.full((len(positives), task.num_classes), np.nan, dtype=np.float32)
    if negatives_known:
        targets[:, sorted(vocab_cols)] = 0.0
    unknown: Counter[str] = Counter()
    for i, found in enumerate(positives):
        for finding in found:
            if finding.lower() not in vocab_lower:
                unknown[finding] += 1
                continue
            col = resolve_finding(finding, index)
            if col is not None:
                targets[i, col] = 1.0
    if unknown:
        listing = ", ".join(f"'{k}' ({n})" for k, n in sorted(unknown.items()))
        if not drop_unmapped:
            raise DataError(
                f"{origin}: unknown finding names {listing}; known: {', '.join(vocabulary)}. "
                "Fix the labels or pass drop-unmapped=true to ignore them"
            )
        logger.warning("%s: ignored unknown findings %s", origin, listing)
    return targets


# ----------------------------------------------------------------------------- NIH ChestX-ray14

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


# ----------------------------------------------------------------------------- CheXpert

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


# ----------------------------------------------------------------------------- manifest

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
    for line, row in enumerate(rows, start=2):
        if not row["path"] or (not row["label"] and not req.task.is_multilabel):
            raise DataError(f"{csv_path} line {line}: empty 'path' or 'label'")
        image = Path(row["path"]).expanduser()
        absolute = image if image.is_absolute() else root / image
        if not absolute.is_file():
            missing.append(row["path"])
            continue
        key = image.as_posix() if not image.is_absolute() else str(absolute)
        records.append(
            ImageRecord(
                req.source_id,
                key,
                tuple(lbl.strip() for lbl in row["label"].split("|") if lbl.strip()) or ("No Finding",),
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


# ----------------------------------------------------------------------------- MedMNIST


@_register(
    "medmnist",
    "MedMNIST npz (pneumoniamnist / chestmnist, any size): {train,val,test}_{images,labels}",
    {"flag": "pneumoniamnist or chestmnist (default: from the file name)", "splits": "splits to include"},
)
def _load_medmnist(req: SourceRequest) -> Catalog:
    from common.data.medmnist import load_medmnist_catalog

    return load_medmnist_catalog(req)


# ----------------------------------------------------------------------------- DICOM


@_register("dicom", DICOM_DESCRIPTION, DICOM_OPTIONS)
def _load_dicom(req: SourceRequest) -> Catalog:
    return load_dicom_catalog(req)


# ----------------------------------------------------------------------------- synthetic

SYNTHETIC_OPTIONS: dict[str, str] = {
    "n_images": "number of images (default 300)",
    "seed": "random seed (default 0)",
    "image_size": "native size in pixels (default 64)",
    "class_weights": "relative class frequencies in task order, comma-separated (default equal)",
    "max_images_per_patient": "1..N images per synthetic patient (default 3)",
    "n_sites": "number of synthetic sites with their own contrast (default 1)",
}


@_register(
    "synthetic",
    "procedural CXR-like images made in memory (smoke tests and demos; not medical data)",
    SYNTHETIC_OPTIONS,
    needs_path=False,
)
def _load_synthetic(req: SourceRequest) -> Catalog:
    task = req.task
    if task.is_multilabel:
        raise DataError(
            f"the synthetic source draws one class per image; task '{task.name}' is multi-label. "
            "Choose normal-pneumonia-covid, normal-pneumonia or normal-covid"
        )
    unknown = [c for c in task.classes if c not in SYNTHETIC_CLASSES]
    if unknown:
        raise DataError(
            f"the synthetic source cannot draw class(es) {unknown}; it knows {list(SYNTHETIC_CLASSES)}"
        )
    n_images = req.opt_int("n_images", 300, minimum=1)
    seed = req.opt_int("seed", 0)
    size = req.opt_int("image_size", 64, minimum=8)
    max_per_patient = req.opt_int("max_images_per_patient", 3, minimum=1)
    n_sites = req.opt_int("n_sites", 1, minimum=1)
    weights_raw = req.opt_list("class_weights", None)
    if weights_raw is None:
        weights = np.ones(task.num_classes)
    else:
        try:
            weights = np.asarray([float(w) for w in weights_raw])
        except ValueError:
            raise ConfigError("class-weights", ",".join(weights_raw), "numbers, one per class") from None
        if len(weights) != task.num_classes or (weights < 0).any() or weights.sum() <= 0:
            raise ConfigError(
                "class-weights",
                ",".join(weights_raw),
                f"{task.num_classes} non-negative numbers for {', '.join(task.classes)}",
            )
    probs = weights / weights.sum()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2024]))
    records: list[ImageRecord] = []
    class_idx: list[int] = []
    patient = 0
    while len(records) < n_images:
        cls = int(rng.choice(task.num_classes, p=probs))
        count = min(int(rng.integers(1, max_per_patient + 1)), n_images - len(records))
        site = int(rng.integers(n_sites))
        for _ in range(count):
            i = len(records)
            image_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
            records.append(
                ImageRecord(
                    req.source_id,
                    f"{i:06d}",
                    (task.classes[cls],),
                    patient_id=f"synth-{patient:05d}",
                    site=f"synthetic-site-{site}" if n_sites > 1 else None,
                    view="PA",
                    meta={"seed": str(image_seed), "site_index": str(site)},
                )
            )
            class_idx.append(cls)
        patient += 1
    targets = np.zeros((len(records), task.num_classes), dtype=np.float32)
    targets[np.arange(len(records)), class_idx] = 1.0
    return _build(req, records, targets, SyntheticReader(size))
