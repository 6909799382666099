"""Label harmonisation: each source's label names mapped explicitly onto a task's classes.

Multi-class sources name their classes in their own way (Kermany ``NORMAL`` / ``PNEUMONIA``,
COVID-19 Radiography ``COVID`` / ``Normal`` / ``Viral Pneumonia`` / ``Lung_Opacity``, ieee8023
``Pneumonia/Viral/COVID-19``). Each source has a small explicit table from its labels to the
*canonical* class names used by the tasks (``normal``, ``pneumonia``, ``covid-19``); a label
maps to ``None`` when the project deliberately gives it no class (``Lung_Opacity``: a finding,
not a diagnosis).

A label with no class in the chosen task (unknown to the table, mapped to None, or mapped to a
class the task lacks, e.g. ``pneumonia`` under the ``normal-covid`` task) is an error listing
every such label and its count, *unless* the user passes the ``drop-unmapped`` option: then
those images are left out and the count is logged. Silent dropping is never the default,
because it quietly changes what a site trains on.

Users may extend or override a table with the ``label-map`` option
(``"Lung_Opacity=pneumonia,Tuberculosis=pneumonia"`` or a mapping).

Multi-label sources (NIH ChestX-ray14, CheXpert, ChestMNIST) map findings by name onto a
multi-label task's findings (:data:`FINDING_SYNONYMS` covers NIH ``Effusion`` = CheXpert
``Pleural Effusion``); a task finding the source never reports is NaN (unknown), a finding the
source reports but the task lacks is ignored.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from common.errors import ConfigError, DataError
from common.tasks import Task

logger = logging.getLogger(__name__)

CANONICAL_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "covid-19")

# Publisher label -> canonical class (None: deliberately no class).
IMAGE_FOLDER_LABELS: dict[str, str | None] = {
    "NORMAL": "normal",
    "Normal": "normal",
    "normal": "normal",
    "PNEUMONIA": "pneumonia",
    "Pneumonia": "pneumonia",
    "pneumonia": "pneumonia",
    "Viral Pneumonia": "pneumonia",
    "COVID": "covid-19",
    "COVID-19": "covid-19",
    "COVID19": "covid-19",
    "covid": "covid-19",
    "covid-19": "covid-19",
    "covid19": "covid-19",
}

COVID19_RADIOGRAPHY_LABELS: dict[str, str | None] = {
    "COVID": "covid-19",
    "Normal": "normal",
    "Viral Pneumonia": "pneumonia",
    "Lung_Opacity": None,
}

MANIFEST_LABELS: dict[str, str | None] = dict(IMAGE_FOLDER_LABELS)

# NIH / CheXpert / ChestMNIST finding names that mean the same thing.
FINDING_SYNONYMS: dict[str, str] = {
    "effusion": "pleural effusion",
    "pleural": "pleural_thickening",
    "pleural thickening": "pleural_thickening",
}


def ieee8023_label(finding: str) -> str | None:
    """Canonical class of an ieee8023 ``finding`` string such as ``Pneumonia/Viral/COVID-19``.

    COVID-19 anywhere in the path -> covid-19; any other path under ``Pneumonia`` (viral,
    bacterial, fungal, lipoid, aspiration) -> pneumonia; ``No Finding`` -> normal; anything
    else (Tuberculosis, todo, ...) -> None.
    """
    parts = [p.strip() for p in finding.split("/") if p.strip()]
    if not parts:
        return None
    if "COVID-19" in parts:
        return "covid-19"
    if parts[0] == "Pneumonia":
        return "pneumonia"
    if parts[0] == "No Finding":
        return "normal"
    return None


def parse_label_map(value: object, option: str = "label-map") -> dict[str, str | None]:
    """The user's ``label-map`` option: ``"A=b,C=d"`` (``C=`` means no class) or a mapping."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(k): (str(v) if v not in (None, "") else None) for k, v in value.items()}
    if isinstance(value, str):
        out: dict[str, str | None] = {}
        for item in value.split(","):
            if not item.strip():
                continue
            src, sep, dst = item.partition("=")
            if not sep:
                raise ConfigError(option, value, "comma-separated SOURCE=class pairs, e.g. 'NORMAL=normal'")
            out[src.strip()] = dst.strip() or None
        return out
    raise ConfigError(option, value, "comma-separated SOURCE=class pairs or a mapping")


def multiclass_targets(
    labels: Sequence[str | None],
    mapping: Mapping[str, str | None] | None,
    task: Task,
    *,
    source: str,
    drop_unmapped: bool,
    origin: str,
    canonical: Sequence[str | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One-hot targets for ``labels`` under ``task``, and the indices of the kept labels.

    Args:
        labels: one publisher label per image.
        mapping: publisher label -> canonical class; None when ``canonical`` is given instead.
        canonical: already-mapped classes (ieee8023's rule), one per image.
        origin: the file or folder the labels come from, for the error message.

    Raises:
        DataError: listing every label the task does not cover, unless ``drop_unmapped``.
    """
    if task.is_multilabel:
        raise DataError(
            f"source '{source}' ({origin}) has one class per image; task '{task.name}' is multi-label. "
            "Choose a multi-class task such as normal-pneumonia-covid"
        )
    if canonical is None:
        if mapping is None:
            raise ValueError("either mapping or canonical is required")
        canonical = [mapping.get(lbl) if lbl is not None else None for lbl in labels]
    keep: list[int] = []
    class_idx: list[int] = []
    unmapped: Counter[str] = Counter()
    for i, (lbl, cls) in enumerate(zip(labels, canonical, strict=True)):
        if cls is not None and cls in task.classes:
            keep.append(i)
            class_idx.append(task.classes.index(cls))
        else:
            unmapped[str(lbl)] += 1
    if unmapped:
        listing = ", ".join(f"'{k}' ({n})" for k, n in sorted(unmapped.items()))
        if not drop_unmapped:
            raise DataError(
                f"{origin}: labels not covered by task '{task.name}' (classes: {', '.join(task.classes)}): "
                f"{listing}. Pass the option drop-unmapped=true to leave those images out, "
                "add label-map='LABEL=class' to map them, or choose another task"
            )
        logger.warning(
            "%s: left out %d images with labels outside task '%s': %s",
            origin,
            sum(unmapped.values()),
            task.name,
            listing,
        )
    targets = np.zeros((len(keep), task.num_classes), dtype=np.float32)
    targets[np.arange(len(keep)), class_idx] = 1.0
    return targets, np.asarray(keep, dtype=np.int64)


def finding_index(task: Task) -> dict[str, int]:
    """Lower-cased (and synonym-resolved) finding name -> column of ``task``."""
    index: dict[str, int] = {}
    for i, name in enumerate(task.classes):
        key = name.lower()
        index[key] = i
        index[FINDING_SYNONYMS.get(key, key)] = i
    return index


def resolve_finding(name: str, index: Mapping[str, int]) -> int | None:
    key = name.strip().lower()
    if key in index:
        return index[key]
    alt = FINDING_SYNONYMS.get(key)
    return index.get(alt) if alt is not None else None


def require_multilabel(task: Task, source: str, origin: str) -> None:
    if not task.is_multilabel:
        raise DataError(
            f"source '{source}' ({origin}) is multi-label (findings per image); task '{task.name}' is "
            "multi-class. Choose a multi-label task: nih14 or chexpert-competition"
        )
