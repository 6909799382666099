"""``ieee8023``: the covid-chestxray-dataset, ``metadata.csv`` + ``images/``."""

from __future__ import annotations

from pathlib import Path

from common.data.catalog import Catalog, ImageRecord
from common.data.labels import ieee8023_label, multiclass_targets, parse_label_map
from common.data.readers import FileReader
from common.data.sources.base import SourceRequest, _build, _path, _register, _report_missing, read_csv_rows
from common.errors import DataError

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
