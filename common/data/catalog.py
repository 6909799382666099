"""The catalog: what a data source knows about its images before any pixel is decoded.

Every source adapter (image folder, COVID-19 Radiography, NIH ChestX-ray14, manifest CSV,
synthetic, ...) turns its publisher's layout into the same thing: a list of
:class:`ImageRecord` plus a reader that can decode one record into a greyscale ``uint8`` array.
Label harmonisation turns each record's *source labels* into the task's label vector
(one-hot for multi-class, 1 / 0 / NaN per finding for multi-label), so that splits,
partitioners, caches and training loops never see a publisher's naming again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from common.tasks import Task


@dataclass(frozen=True)
class ImageRecord:
    """One image as its source describes it.

    Attributes:
        source: the source instance's id (its format name, or ``format:name`` when several
            sources of one format are combined); selects the reader in :class:`Catalog`.
        key: unique within the source, stable across runs (relative path, or ``split/index``).
        source_labels: the publisher's labels for the image (one for a multi-class source, the
            positive findings for a multi-label one, e.g. ``("Effusion", "Mass")``).
        patient_id: groups images of one patient for leak-free splits (None when unknown).
        site: the institution or origin the image came from, when known (natural partitions).
        view: radiographic view (PA, AP, ...) when known.
        meta: anything else worth keeping (subtype, URL, split in the release, ...).
    """

    source: str
    key: str
    source_labels: tuple[str, ...]
    patient_id: str | None = None
    site: str | None = None
    view: str | None = None
    meta: Mapping[str, str] = field(default_factory=dict)


class ImageReader(Protocol):
    """Decodes one record into a 2-D greyscale uint8 array at its stored resolution."""

    def read(self, record: ImageRecord) -> np.ndarray: ...

    def fingerprint(self, record: ImageRecord) -> str:
        """A short string that changes when the record's underlying bytes change (cache key)."""
        ...


@dataclass
class Catalog:
    """Records of one or more sources, with the task's label vectors already computed.

    ``targets[i]`` is the float32 label vector of ``records[i]`` for ``task``. ``left_out``
    counts, by reason, the files a source saw but did not take (e.g. a DICOM CT slice); it
    describes the source, so subsets keep it and joined catalogs add it up.
    """

    task: Task
    records: list[ImageRecord]
    targets: np.ndarray
    readers: dict[str, ImageReader]
    left_out: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.targets.shape != (len(self.records), self.task.num_classes):
            raise ValueError(
                f"targets shape {self.targets.shape} does not match "
                f"{len(self.records)} records x {self.task.num_classes} classes"
            )

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Catalog:
        idx = np.asarray(indices, dtype=np.int64)
        return Catalog(
            self.task, [self.records[i] for i in idx], self.targets[idx], self.readers, dict(self.left_out)
        )

    def read(self, index: int) -> np.ndarray:
        record = self.records[index]
        return self.readers[record.source].read(record)

    def class_counts(self) -> dict[str, int]:
        """Images per class (multi-class) or positives per finding (multi-label)."""
        positives = np.nansum(self.targets, axis=0)
        return {name: int(n) for name, n in zip(self.task.classes, positives, strict=True)}

    def primary_labels(self) -> np.ndarray:
        """One integer label per image for stratification and label-skew partitioning.

        Multi-class: the class index. Multi-label: the index of the first positive finding,
        or ``num_classes`` for an image with no positive finding ("no finding").
        """
        filled = np.nan_to_num(self.targets, nan=0.0)
        if not self.task.is_multilabel:
            return filled.argmax(axis=1)
        has_positive = filled.max(axis=1) > 0
        return np.where(has_positive, filled.argmax(axis=1), self.task.num_classes)

    @staticmethod
    def concat(catalogs: Sequence[Catalog]) -> Catalog:
        """Join catalogs of the same task (e.g. Kermany + COVID-19 Radiography)."""
        if not catalogs:
            raise ValueError("no catalogs to join")
        task = catalogs[0].task
        readers: dict[str, ImageReader] = {}
        for cat in catalogs:
            if cat.task != task:
                raise ValueError(f"cannot join task '{cat.task.name}' with task '{task.name}'")
            for name, reader in cat.readers.items():
                if name in readers and readers[name] is not reader:
                    raise ValueError(f"two sources share the id '{name}'; give them distinct names")
                readers[name] = reader
        records = [r for cat in catalogs for r in cat.records]
        targets = np.concatenate([cat.targets for cat in catalogs], axis=0)
        left_out: dict[str, int] = {}
        for cat in catalogs:
            for reason, count in cat.left_out.items():
                left_out[reason] = left_out.get(reason, 0) + count
        return Catalog(task, records, targets, readers, left_out)
