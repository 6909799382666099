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

The package: :mod:`~common.data.sources.base` (registry, request, :func:`load_catalog`, CSV
helpers) and one module per adapter; importing the package registers every adapter. A new
adapter module registers itself with ``@_register(...)`` (imported from ``.base``) and is
imported below.
"""

from __future__ import annotations

from common.data.sources import (  # noqa: F401  (imported to register their adapters)
    chexpert,
    covid19_radiography,
    dicom,
    ieee8023,
    image_folder,
    manifest,
    medmnist,
    nih14,
    synthetic,
)
from common.data.sources.base import (
    COMMON_OPTIONS,
    SOURCES,
    Loader,
    SourceRequest,
    SourceSpec,
    _build,
    _chosen_folders,
    _dash,
    _is_image,
    _list_images,
    _multiclass,
    _path,
    _register,
    _report_missing,
    load_catalog,
    multilabel_targets,
    read_csv_rows,
)
from common.data.sources.chexpert import CHEXPERT_FINDINGS, UNCERTAINTY_POLICIES
from common.data.sources.ieee8023 import IEEE8023_COLUMNS
from common.data.sources.image_folder import SPLIT_NAMES, kermany_patient
from common.data.sources.manifest import MANIFEST_COLUMNS
from common.data.sources.nih14 import NIH_COLUMNS
from common.data.sources.synthetic import SYNTHETIC_OPTIONS

__all__ = [
    "CHEXPERT_FINDINGS",
    "COMMON_OPTIONS",
    "IEEE8023_COLUMNS",
    "MANIFEST_COLUMNS",
    "NIH_COLUMNS",
    "SOURCES",
    "SPLIT_NAMES",
    "SYNTHETIC_OPTIONS",
    "UNCERTAINTY_POLICIES",
    "Loader",
    "SourceRequest",
    "SourceSpec",
    "_build",
    "_chosen_folders",
    "_dash",
    "_is_image",
    "_list_images",
    "_multiclass",
    "_path",
    "_register",
    "_report_missing",
    "kermany_patient",
    "load_catalog",
    "multilabel_targets",
    "read_csv_rows",
]
