"""What every source adapter shares: the registry, the request a loader gets, CSV helpers.

An adapter is a function ``SourceRequest -> Catalog`` registered under its format name with
:func:`_register` (``@_register("image-folder", "description", {option: help})``); the
package :mod:`common.data.sources` imports each adapter module once so that all are registered.
:func:`load_catalog` validates the format, options and path, then calls the adapter.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.catalog import Catalog, ImageRecord
from common.data.labels import finding_index, multiclass_targets, parse_label_map, resolve_finding
from common.data.readers import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, FileReader
from common.errors import ConfigError, DataError
from common.registry import Registry
from common.run_settings import parse_bool
from common.tasks import Task

logger = logging.getLogger(__name__)

Loader = Callable[["SourceRequest"], Catalog]

COMMON_OPTIONS: dict[str, str] = {
    "drop_unmapped": "leave out images whose label the task does not cover (default: error)",
    "label_map": "extra SOURCE=class pairs, comma-separated",
    "site": "site name for records that carry none",
    "max_image_pixels": f"cap on the pixels of one decoded image (default {MAX_IMAGE_PIXELS:,})",
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
        return parse_bool(_dash(name), self.options.get(name, default), text=True)

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

    def opt_float(self, name: str, default: float) -> float:
        value = self.options.get(name, default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(_dash(name), value, "a number") from None
        if not math.isfinite(number):
            raise ConfigError(_dash(name), value, "a finite number")
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
    request = SourceRequest(fmt, resolved, task, source_id, opts, strict)
    catalog = spec.loader(request)
    if "max_image_pixels" in opts:
        cap = request.opt_int("max_image_pixels", MAX_IMAGE_PIXELS, minimum=1)
        for reader in catalog.readers.values():
            if isinstance(reader, FileReader):
                reader.max_pixels = cap
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


def _chosen_folders(req: SourceRequest, option: str, folders: list[Path], what: str) -> list[Path]:
    """The folders an option names (``splits=train``; all when it is unset); unknown names: error."""
    wanted = req.opt_list(option, None)
    if wanted is None:
        return folders
    if set(wanted) - {d.name for d in folders}:
        raise ConfigError(option, ",".join(wanted), f"{what}: " + ", ".join(d.name for d in folders))
    return [d for d in folders if d.name in wanted]


def read_csv_rows(path: Path, required: Iterable[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Rows of a CSV (or .xlsx) as dicts; DataError naming the file and any missing columns."""
    if not path.is_file():
        raise DataError(f"file {path} does not exist")
    if path.suffix.lower() == ".xlsx":
        header, rows = _read_xlsx(path)
    else:
        try:
            with path.open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                header = [h.strip() for h in (reader.fieldnames or [])]
                rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path} is not UTF-8 text (byte {exc.start} is not UTF-8); save it as UTF-8 "
                "(e.g. 'CSV UTF-8' in a spreadsheet program)"
            ) from None
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
