"""``covid19-radiography``: the COVID-19 Radiography Database, ``<class>/images/`` + metadata."""

from __future__ import annotations

import logging
from pathlib import Path

from common.data.catalog import Catalog, ImageRecord
from common.data.labels import COVID19_RADIOGRAPHY_LABELS
from common.data.readers import FileReader
from common.data.sources.base import (
    SourceRequest,
    _chosen_folders,
    _list_images,
    _multiclass,
    _path,
    _register,
    read_csv_rows,
)
from common.errors import DataError

logger = logging.getLogger(__name__)


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
    class_dirs = _chosen_folders(req, "classes", class_dirs, f"class folders in {root}")
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
