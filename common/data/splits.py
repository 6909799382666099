"""Train / validation / test splits grouped by patient, stratified by label, seeded.

All images of one patient land in the same split, so no patient is both trained on and tested
on (Kermany has up to dozens of images per child, NIH up to hundreds per patient). Records
without a patient id form their own group.

Algorithm (greedy, deterministic given the seed): groups are shuffled with the seed, then
ordered largest first; each group goes to the split whose remaining quota for this group's
labels is largest relative to that split's target (target = fraction x the label's total).
Large groups are placed while every split still has room, small ones fill the gaps, and each
split's label mix follows the whole site's within a few images. Stratification uses
:meth:`Catalog.primary_labels` (the class for multi-class, the first positive finding or
"no finding" for multi-label).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data.catalog import Catalog
from common.errors import ConfigError, DataError


@dataclass(frozen=True)
class Split:
    """Row indices into the catalog for each part, plus the seed and fractions used."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int
    val_fraction: float
    test_fraction: float

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def patient_groups(catalog: Catalog) -> np.ndarray:
    """One integer group per record: equal for records of the same (source, patient)."""
    ids: dict[tuple[str, str], int] = {}
    groups = np.empty(len(catalog), dtype=np.int64)
    for i, record in enumerate(catalog.records):
        key = (record.source, record.patient_id) if record.patient_id is not None else ("", f"__record_{i}")
        groups[i] = ids.setdefault(key, len(ids))
    return groups


def split_by_patient(
    catalog: Catalog,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> Split:
    """Split ``catalog`` into train / val / test with no patient in two parts.

    Raises:
        ConfigError: fractions outside [0, 1) or summing to 1 or more.
        DataError: too few images or patients for the requested parts.
    """
    for option, value in (("val-fraction", val_fraction), ("test-fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(option, value, "a number in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError("val-fraction + test-fraction", val_fraction + test_fraction, "a sum below 1")
    n = len(catalog)
    groups = patient_groups(catalog)
    n_groups = int(groups.max()) + 1 if n else 0
    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    wanted = int((fractions > 0).sum())
    needed_images = {
        name: f * n for name, f in zip(("train", "val", "test"), fractions, strict=True) if f > 0
    }
    if n_groups < wanted or any(v < 1.0 for v in needed_images.values()):
        raise DataError(
            f"too few images for the requested split: {n} images from {n_groups} patients, asked for "
            f"val-fraction={val_fraction} and test-fraction={test_fraction} (each part needs at least one "
            "patient and one image). Lower the fractions, set them to 0, or add data to this site"
        )
    labels = catalog.primary_labels()
    n_labels = int(labels.max()) + 1
    group_counts = np.zeros((n_groups, n_labels), dtype=np.float64)
    np.add.at(group_counts, (groups, labels), 1.0)
    totals = group_counts.sum(axis=0)
    targets = fractions[:, None] * totals[None, :]  # [3, L]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-group_counts[order].sum(axis=1), kind="stable")]
    counts = np.zeros_like(targets)
    assignment = np.empty(n_groups, dtype=np.int64)
    active = fractions > 0
    filled = np.zeros(3, dtype=bool)
    for position, g in enumerate(order):
        gc = group_counts[g]
        empty = np.flatnonzero(active & ~filled)
        if len(empty) and n_groups - position <= len(empty):
            # Just enough groups left to give every requested part one: do so.
            best = int(empty[np.argmax(fractions[empty])])
            assignment[g] = best
            counts[best] += gc
            filled[best] = True
            continue
        room = (targets - counts) / np.maximum(targets, 1e-9)  # relative remaining quota per label
        score = (room * gc[None, :]).sum(axis=1) / gc.sum()
        score = np.where(active, score, -np.inf)
        best = int(np.argmax(score + 1e-9 * fractions))  # ties -> the larger part
        assignment[g] = best
        counts[best] += gc
        filled[best] = True
    part_of_record = assignment[groups]
    train, val, test = (np.flatnonzero(part_of_record == k) for k in range(3))
    for name, idx, frac in (
        ("train", train, fractions[0]),
        ("val", val, val_fraction),
        ("test", test, test_fraction),
    ):
        if frac > 0 and len(idx) == 0:
            raise DataError(
                f"the {name} part came out empty ({n} images from {n_groups} patients, "
                f"val-fraction={val_fraction}, test-fraction={test_fraction}); "
                "lower the fractions or add data"
            )
    return Split(train, val, test, seed, val_fraction, test_fraction)
