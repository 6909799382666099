"""``image-folder``: one subfolder per class, optionally under train/val/test split folders."""

from __future__ import annotations

import re

from common.data.catalog import Catalog, ImageRecord
from common.data.labels import IMAGE_FOLDER_LABELS
from common.data.readers import IMAGE_SUFFIXES, FileReader
from common.data.sources.base import (
    SourceRequest,
    _chosen_folders,
    _list_images,
    _multiclass,
    _path,
    _register,
)
from common.errors import DataError

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
        split_dirs = _chosen_folders(req, "splits", split_dirs, f"split folders present in {root}")
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
