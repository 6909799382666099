"""Non-IID partitions of a catalog into simulated hospital sites.

This module owns the partitioners of ``python -m simulation`` and the files a partition is
written to. Each registered partitioner (:data:`PARTITIONERS`) is built on a flwr-datasets
partitioner working over a small local :class:`datasets.Dataset` (no hub, no network):

- ``iid``: shuffled, then equal shares (``IidPartitioner``).
- ``dirichlet``: label skew; for every class, site shares ~ Dirichlet(alpha)
  (``DirichletPartitioner``, which resamples until every site has ``min_site_size`` units).
- ``pathological``: each site holds ``classes_per_site`` classes (``PathologicalPartitioner``).
  With at least as many sites as classes, class ``i % C`` goes to site ``i`` and the rest are
  drawn at random (the paper's "first-deterministic" mode), so every class lands somewhere; with
  fewer sites, site ``i`` gets classes ``i, i+1, ... (mod C)``, which needs
  ``sites + classes_per_site - 1 >= C``.
- ``quantity-skew``: labels IID, site sizes ``min_site_size + Multinomial(rest, Dirichlet(alpha))``
  (``SizePartitioner`` over a shuffled dataset). Small alpha, very unequal sites.
- ``natural``: one site per distinct ``record.site`` (or ``record.source`` with
  ``natural_by="source"``); when fewer sites are asked for than there are natural ids, whole
  natural ids are merged into ``num_sites`` groups, largest first into the currently smallest
  group (``NaturalIdPartitioner`` over the merged ids).

Partitions are made at the *patient* level when records carry patient ids (``by_patient``): all
images of one patient (per source) form one unit, labelled by the unit's majority label (ties:
lowest class index), which the partitioner places as a whole; units are then expanded back to
images. So no patient is ever split across sites. ``min_site_size`` counts these units.

Labels for skew are :meth:`Catalog.primary_labels` (for multi-label tasks the first positive
finding, or "no finding"). :func:`label_skew` measures how non-IID a partition is.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from common.data.catalog import Catalog, ImageRecord
from common.data.sources.manifest import MANIFEST_HEADER, manifest_row, record_path
from common.errors import ConfigError, DataError
from common.markdown import table
from common.registry import Registry

if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

logger = logging.getLogger(__name__)

NaturalBy = Literal["site", "source"]
NATURAL_BY: tuple[str, ...] = ("site", "source")
DEFAULT_ALPHA = 0.5
DEFAULT_CLASSES_PER_SITE = 2
DEFAULT_MIN_SITE_SIZE = 10
NO_FINDING = "no finding"


@dataclass(frozen=True)
class PartitionSettings:
    """Everything needed to reproduce a partition (recorded in ``partition.json``).

    ``alpha`` and ``classes_per_site`` are None for partitioners that do not use them.
    """

    partitioner: str
    num_sites: int
    seed: int
    alpha: float | None = None
    classes_per_site: int | None = None
    min_site_size: int = DEFAULT_MIN_SITE_SIZE
    by_patient: bool = True
    natural_by: NaturalBy | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Partition:
    """Disjoint per-site index arrays into a catalog, covering every record once.

    Attributes:
        sites: ``sites[s]`` holds the catalog indices of site ``s``, ascending.
        settings: how the partition was made.
        site_names: ``site_00``, ``site_01``, ... (also the manifest file stems).
        natural_ids: for natural partitions, the natural ids (site or source values) in each site.
    """

    sites: tuple[np.ndarray, ...]
    settings: PartitionSettings
    site_names: tuple[str, ...]
    natural_ids: tuple[tuple[str, ...], ...] | None = None

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    def sizes(self) -> list[int]:
        return [len(idx) for idx in self.sites]

    def site_of(self, num_records: int) -> np.ndarray:
        """The site index of every record (length ``num_records``)."""
        out = np.full(num_records, -1, dtype=np.int64)
        for s, idx in enumerate(self.sites):
            out[idx] = s
        return out


PartitionFn = Callable[["_Units", PartitionSettings], "list[np.ndarray]"]
PARTITIONERS: Registry[PartitionFn] = Registry("partitioner")


@dataclass(frozen=True)
class _Units:
    """The units a partitioner places: patients (or single images), with their labels.

    ``order`` is a seeded permutation of the units; the local dataset lists units in that order so
    that partitioners which cut contiguous runs (IID shards, sizes, per-class splits) cut at random.
    """

    labels: np.ndarray  # [U] primary label per unit
    natural: np.ndarray | None  # [U] natural id per unit (natural partitioner only)
    order: np.ndarray  # [U] seeded permutation
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self) -> datasets.Dataset:
        import datasets

        columns: dict[str, list[Any]] = {
            "unit": self.order.tolist(),
            "label": self.labels[self.order].tolist(),
        }
        if self.natural is not None:
            columns["natural"] = self.natural[self.order].tolist()
        return datasets.Dataset.from_dict(columns)


def _run_flwr(partitioner: Partitioner, units: _Units, num_sites: int) -> list[np.ndarray]:
    """Assign the units' dataset to a flwr-datasets partitioner and read back unit ids per site."""
    partitioner.dataset = units.dataset()
    out = []
    # NaturalIdPartitioner draws a tqdm bar on stderr; flwr warns (and retries) on small sites.
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for site in range(num_sites):
            out.append(np.asarray(partitioner.load_partition(site)["unit"], dtype=np.int64))
    for warning in caught:
        logger.debug("flwr-datasets: %s", warning.message)
    return out


@PARTITIONERS.register("iid")
def _iid(units: _Units, settings: PartitionSettings) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    return _run_flwr(IidPartitioner(num_partitions=settings.num_sites), units, settings.num_sites)


@PARTITIONERS.register("dirichlet")
def _dirichlet(units: _Units, settings: PartitionSettings) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    assert settings.alpha is not None
    partitioner = DirichletPartitioner(
        num_partitions=settings.num_sites,
        partition_by="label",
        alpha=float(settings.alpha),
        min_partition_size=settings.min_site_size,
        self_balancing=False,
        shuffle=True,
        seed=settings.seed,
    )
    try:
        return _run_flwr(partitioner, units, settings.num_sites)
    except ValueError as exc:
        if "max number of attempts" not in str(exc):
            raise
        raise DataError(
            f"a Dirichlet split with alpha={settings.alpha} over {len(set(units.labels.tolist()))} "
            f"classes could not give each of the {settings.num_sites} sites at least "
            f"{settings.min_site_size} {_unit_word(settings)} in 11 draws (with few classes and a "
            "small alpha most sites get almost nothing). Use fewer --sites, a larger --alpha, "
            "a smaller --min-site-size, or another --seed."
        ) from None


@PARTITIONERS.register("pathological")
def _pathological(units: _Units, settings: PartitionSettings) -> list[np.ndarray]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    assert settings.classes_per_site is not None
    present = sorted(set(units.labels.tolist()))
    k, sites, num_present = settings.classes_per_site, settings.num_sites, len(present)
    if sites >= num_present:
        mode: Literal["first-deterministic", "deterministic"] = "first-deterministic"
    elif sites + k - 1 >= num_present:
        mode = "deterministic"
    else:
        raise ConfigError(
            "classes-per-site",
            k,
            f"with {sites} sites and {num_present} classes present, at least {num_present - sites + 1} "
            "(sites + classes-per-site - 1 must reach the number of classes, so that no class is "
            "left out of every site); or use more --sites",
        )
    counts = Counter(units.labels.tolist())
    for label in present:
        # sites holding `label`: each needs at least one unit of it
        holders = sum(1 for s in range(sites) for i in range(k) if present[(s + i) % num_present] == label)
        if mode == "deterministic" and holders > counts[label]:
            raise DataError(
                f"class '{units.label_names[label]}' has {counts[label]} {_unit_word(settings)} but "
                f"{holders} sites need some of it; use fewer --sites or a smaller --classes-per-site"
            )
    partitioner = PathologicalPartitioner(
        num_partitions=sites,
        partition_by="label",
        num_classes_per_partition=k,
        class_assignment_mode=mode,
        shuffle=True,
        seed=settings.seed,
    )
    try:
        return _run_flwr(partitioner, units, sites)
    except ValueError as exc:
        raise DataError(
            f"a pathological split with {k} classes per site over {sites} sites is not possible "
            f"for this data: {exc}"
        ) from None


@PARTITIONERS.register("quantity-skew")
def _quantity_skew(units: _Units, settings: PartitionSettings) -> list[np.ndarray]:
    from flwr_datasets.partitioner import SizePartitioner

    assert settings.alpha is not None
    rng = np.random.default_rng([settings.seed, 1])
    sites, base = settings.num_sites, settings.min_site_size
    rest = len(units) - sites * base
    shares = rng.dirichlet(np.full(sites, float(settings.alpha)))
    sizes = base + rng.multinomial(rest, shares)
    partitioner = SizePartitioner(partition_sizes=[int(n) for n in sizes])
    return _run_flwr(partitioner, units, sites)


@PARTITIONERS.register("natural")
def _natural(units: _Units, settings: PartitionSettings) -> list[np.ndarray]:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    assert units.natural is not None
    merged = _merge_natural_ids(units.natural, settings.num_sites)
    grouped = _Units(
        labels=units.labels,
        natural=np.asarray([merged[n] for n in units.natural.tolist()]),
        order=units.order,
        label_names=units.label_names,
    )
    return _run_flwr(NaturalIdPartitioner(partition_by="natural"), grouped, settings.num_sites)


def _merge_natural_ids(natural: np.ndarray, num_sites: int) -> dict[str, str]:
    """Map each natural id to a group name ``g000``... with ``num_sites`` groups balanced by size.

    Largest natural id first, each into the group with the fewest units so far (ties: lowest
    group). With as many sites as natural ids, each id is its own group, in sorted id order.
    """
    counts = Counter(natural.tolist())
    ids = sorted(counts)
    if num_sites == len(ids):
        return {n: f"g{i:03d}" for i, n in enumerate(ids)}
    loads = [0] * num_sites
    mapping: dict[str, str] = {}
    for n in sorted(ids, key=lambda n: (-counts[n], n)):
        target = min(range(num_sites), key=lambda g: (loads[g], g))
        loads[target] += counts[n]
        mapping[n] = f"g{target:03d}"
    return mapping


def _unit_word(settings: PartitionSettings) -> str:
    return "patients (or images without a patient id)" if settings.by_patient else "images"


def _label_names(catalog: Catalog) -> tuple[str, ...]:
    names = tuple(catalog.task.classes)
    return (*names, NO_FINDING) if catalog.task.is_multilabel else names


def _natural_key(record: ImageRecord, natural_by: NaturalBy) -> str | None:
    return record.site if natural_by == "site" else record.source


def _majority(values: Sequence[Any]) -> Any:
    """The most common value; ties go to the smallest."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, c in counts.items() if c == best)


def _group_units(catalog: Catalog, by_patient: bool) -> tuple[np.ndarray, list[list[int]]]:
    """Unit id of every record, and the records of every unit (patients per source, or images)."""
    unit_of = np.empty(len(catalog), dtype=np.int64)
    members: list[list[int]] = []
    seen: dict[tuple[str, str], int] = {}
    for i, record in enumerate(catalog.records):
        if by_patient and record.patient_id is not None:
            key = (record.source, record.patient_id)
            unit = seen.get(key)
            if unit is None:
                unit = seen[key] = len(members)
                members.append([])
        else:
            unit = len(members)
            members.append([])
        members[unit].append(i)
        unit_of[i] = unit
    return unit_of, members


def _check_settings(
    catalog: Catalog,
    partitioner: str,
    num_sites: int | None,
    alpha: float | None,
    classes_per_site: int | None,
    min_site_size: int,
    natural_by: str,
) -> None:
    PARTITIONERS.get(partitioner)  # UnknownNameError listing the valid names
    if len(catalog) == 0:
        raise DataError("the catalog has no images to partition; check --source and --data")
    if num_sites is not None and (isinstance(num_sites, bool) or num_sites < 1):
        raise ConfigError("sites", num_sites, "an integer >= 1")
    if num_sites is None and partitioner != "natural":
        raise ConfigError("sites", num_sites, f"an integer >= 1 (the '{partitioner}' partitioner needs it)")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError("alpha", alpha, "a finite number > 0 (small: more skew, large: close to IID)")
    if classes_per_site is not None and classes_per_site < 1:
        raise ConfigError("classes-per-site", classes_per_site, "an integer >= 1")
    if min_site_size < 1:
        raise ConfigError("min-site-size", min_site_size, "an integer >= 1")
    if natural_by not in NATURAL_BY:
        raise ConfigError("natural-by", natural_by, "one of " + ", ".join(NATURAL_BY))
    unused = {
        "alpha": alpha is not None and partitioner not in ("dirichlet", "quantity-skew"),
        "classes-per-site": classes_per_site is not None and partitioner != "pathological",
    }
    for option, ignored in unused.items():
        if ignored:
            logger.warning("option '%s' is ignored by the '%s' partitioner", option, partitioner)


def _check_classes_present(
    catalog: Catalog, label_names: tuple[str, ...], record_labels: np.ndarray, require_all_classes: bool
) -> None:
    """Warn (or with ``require_all_classes`` refuse) when a class of the task has no image."""
    if catalog.task.is_multilabel:  # a finding is present when any image has it, first or not
        present_counts = np.sum(np.nan_to_num(catalog.targets, nan=0.0) == 1, axis=0)
    else:
        present_counts = np.bincount(record_labels, minlength=len(label_names))
    missing = [label_names[c] for c in range(catalog.task.num_classes) if present_counts[c] == 0]
    if missing:
        message = (
            f"class(es) {', '.join(missing)} of task '{catalog.task.name}' have no image in the data, "
            "so every site would miss them"
        )
        if require_all_classes:
            raise DataError(message + "; add a source that has them or choose a task without them")
        logger.warning(message)


def _natural_ids(
    catalog: Catalog, members: list[list[int]], natural_by: NaturalBy, num_sites: int | None
) -> tuple[np.ndarray, int]:
    """Each unit's natural id (its majority site or source) and the number of sites (by default
    one per natural id; never more than there are)."""
    keys = [_natural_key(r, natural_by) for r in catalog.records]
    unknown = sum(1 for k in keys if k is None or k == "")
    if unknown:
        without = sorted({r.source for r, k in zip(catalog.records, keys, strict=True) if not k})
        raise DataError(
            f"a natural split by {natural_by} needs every image's {natural_by}, but {unknown} of "
            f"{len(keys)} images have none (sources: "
            f"{', '.join(without)}); "
            "use --natural-by source to make one site per data source, or another --partition"
        )
    unit_natural = [_majority([keys[i] for i in m]) for m in members]
    split = sum(1 for m in members if len({keys[i] for i in m}) > 1)
    if split:
        logger.warning("%d patients span several %ss; each goes to its majority one", split, natural_by)
    natural_ids = np.asarray(unit_natural, dtype=object)
    num_natural = len(set(unit_natural))
    if num_sites is None:
        num_sites = num_natural
    elif num_sites > num_natural:
        raise DataError(
            f"a natural split by {natural_by} found {num_natural} distinct value(s) "
            f"({', '.join(sorted(set(unit_natural))[:10])}) but --sites is {num_sites}; use "
            f"--sites {num_natural} or fewer (natural ids are merged into fewer sites)"
        )
    return natural_ids, num_sites


def _check_room(
    catalog: Catalog,
    partitioner: str,
    num_sites: int,
    min_site_size: int,
    by_patient: bool,
    classes_per_site: int | None,
    members: list[list[int]],
    unit_labels: np.ndarray,
) -> None:
    """Refuse a split the data cannot fill: too few units for the sites, or more classes per site
    than the data has (``pathological``)."""
    if num_sites * min_site_size > len(members):
        what = "patients" if by_patient and any(r.patient_id for r in catalog.records) else "images"
        raise DataError(
            f"{num_sites} sites of at least {min_site_size} {what} need {num_sites * min_site_size} "
            f"{what}, but the data has {len(members)}; use fewer --sites or a smaller --min-site-size"
        )
    if partitioner == "pathological":
        k = classes_per_site or DEFAULT_CLASSES_PER_SITE
        num_present = int((np.bincount(unit_labels, minlength=len(_label_names(catalog))) > 0).sum())
        if k > num_present:
            raise ConfigError("classes-per-site", k, f"at most {num_present} (classes in the data)")


def partition_catalog(
    catalog: Catalog,
    partitioner: str,
    num_sites: int | None,
    *,
    seed: int,
    alpha: float | None = None,
    classes_per_site: int | None = None,
    min_site_size: int = DEFAULT_MIN_SITE_SIZE,
    by_patient: bool = True,
    natural_by: NaturalBy = "site",
    require_all_classes: bool = False,
) -> Partition:
    """Split ``catalog`` into ``num_sites`` disjoint sites with the named partitioner.

    Args:
        catalog: the images to split (one or more sources joined).
        partitioner: a name in :data:`PARTITIONERS`.
        num_sites: number of sites; for ``natural`` it may be None (one site per natural id).
        seed: seeds every random choice; the same seed gives the same partition.
        alpha: Dirichlet concentration for ``dirichlet`` (label skew) and ``quantity-skew``
            (size skew); defaults to 0.5. Small alpha, strong skew.
        classes_per_site: classes per site for ``pathological`` (default 2).
        min_site_size: smallest allowed site, in units (patients, or images without patient
            ids); every site must reach it.
        by_patient: keep all images of a patient in one site (patients are the units).
        natural_by: which record field ``natural`` splits by: ``site`` or ``source``.
        require_all_classes: raise if a class of the task has no image at all (a federation
            cannot learn a class that is missing from every site).

    Raises:
        UnknownNameError: unknown partitioner. ConfigError: a bad option value.
        DataError: the data cannot be split that way (too few images for the sites, a class
            left out of every site, no site metadata for a natural split, ...).
    """
    _check_settings(catalog, partitioner, num_sites, alpha, classes_per_site, min_site_size, natural_by)
    label_names = _label_names(catalog)
    record_labels = catalog.primary_labels().astype(np.int64)
    _check_classes_present(catalog, label_names, record_labels, require_all_classes)
    unit_of, members = _group_units(catalog, by_patient)
    unit_labels = np.asarray([_majority(record_labels[m].tolist()) for m in members], dtype=np.int64)
    if by_patient:
        mixed = sum(1 for m in members if len(set(record_labels[m].tolist())) > 1)
        if mixed:
            logger.info("%d patients have images of several classes; placed by majority label", mixed)

    natural_ids: np.ndarray | None = None
    if partitioner == "natural":
        natural_ids, num_sites = _natural_ids(catalog, members, natural_by, num_sites)
    assert num_sites is not None

    _check_room(
        catalog, partitioner, num_sites, min_site_size, by_patient, classes_per_site, members, unit_labels
    )
    settings = PartitionSettings(
        partitioner=partitioner,
        num_sites=num_sites,
        seed=seed,
        alpha=(alpha if alpha is not None else DEFAULT_ALPHA)
        if partitioner in ("dirichlet", "quantity-skew")
        else None,
        classes_per_site=(classes_per_site or DEFAULT_CLASSES_PER_SITE)
        if partitioner == "pathological"
        else None,
        min_site_size=min_site_size,
        by_patient=by_patient,
        natural_by=natural_by if partitioner == "natural" else None,
    )
    units = _Units(
        labels=unit_labels,
        natural=natural_ids,
        order=np.random.default_rng(seed).permutation(len(members)),
        label_names=label_names,
    )
    unit_sites = PARTITIONERS.get(partitioner)(units, settings)
    partition = _expand(catalog, units, unit_sites, unit_of, settings)
    _check_partition(partition, catalog, units, unit_sites, label_names)
    return partition


def _expand(
    catalog: Catalog,
    units: _Units,
    unit_sites: list[np.ndarray],
    unit_of: np.ndarray,
    settings: PartitionSettings,
) -> Partition:
    site_of_unit = np.full(len(units), -1, dtype=np.int64)
    for s, members in enumerate(unit_sites):
        if np.any(site_of_unit[members] != -1) or len(set(members.tolist())) != len(members):
            raise RuntimeError(f"partitioner '{settings.partitioner}' placed a unit in two sites")
        site_of_unit[members] = s
    site_of_record = site_of_unit[unit_of]
    sites = tuple(np.flatnonzero(site_of_record == s) for s in range(settings.num_sites))
    natural: tuple[tuple[str, ...], ...] | None = None
    if units.natural is not None:
        natural = tuple(tuple(sorted(set(units.natural[m].tolist()))) for m in unit_sites)
    names = tuple(f"site_{s:02d}" for s in range(settings.num_sites))
    return Partition(sites=sites, settings=settings, site_names=names, natural_ids=natural)


def _check_partition(
    partition: Partition,
    catalog: Catalog,
    units: _Units,
    unit_sites: list[np.ndarray],
    label_names: tuple[str, ...],
) -> None:
    placed = np.zeros(len(units), dtype=bool)
    for members in unit_sites:
        placed[members] = True
    if not placed.all():
        left = sorted({label_names[c] for c in units.labels[~placed].tolist()})
        raise DataError(
            f"the '{partition.settings.partitioner}' partition left {int((~placed).sum())} units of "
            f"class(es) {', '.join(left)} out of every site; use more --sites or a larger "
            "--classes-per-site"
        )
    min_size = partition.settings.min_site_size
    small = [(n, s) for n, s in zip(partition.site_names, partition.sizes(), strict=True) if s < min_size]
    if small:
        listed = ", ".join(f"{n} ({s})" for n, s in small)
        raise DataError(
            f"site(s) {listed} have fewer than --min-site-size {min_size} images; use fewer --sites, "
            "another --partition or a smaller --min-site-size"
        )


def label_counts(partition: Partition, catalog: Catalog) -> np.ndarray:
    """Images per site and primary label: ``[num_sites, num_labels]`` integers.

    Columns are the task's classes (plus "no finding" for multi-label tasks).
    """
    labels = catalog.primary_labels().astype(np.int64)
    width = len(_label_names(catalog))
    return np.stack([np.bincount(labels[idx], minlength=width) for idx in partition.sites]).astype(np.int64)


def label_skew(partition: Partition, catalog: Catalog) -> float:
    """Mean total-variation distance between each site's label distribution and the global one.

    ``mean_s 0.5 * sum_c |p_s(c) - p(c)|`` over primary labels, unweighted over sites, empty sites
    excluded. 0 when every site has the global label mix; close to 1 when each site holds one
    class that is rare overall.
    """
    counts = label_counts(partition, catalog).astype(np.float64)
    global_dist = counts.sum(axis=0) / counts.sum()
    sizes = counts.sum(axis=1)
    site_dists = counts[sizes > 0] / sizes[sizes > 0, None]
    return float(np.mean(0.5 * np.abs(site_dists - global_dist).sum(axis=1)))


def label_table_rows(partition: Partition, catalog: Catalog) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the label table: one row per site, a column per label, totals last."""
    counts = label_counts(partition, catalog)
    header = ["site", *_label_names(catalog), "total"]
    rows = [
        [name, *(str(int(v)) for v in row), str(int(row.sum()))]
        for name, row in zip(partition.site_names, counts, strict=True)
    ]
    totals = counts.sum(axis=0)
    rows.append(["all", *(str(int(v)) for v in totals), str(int(totals.sum()))])
    return header, rows


def label_table_markdown(partition: Partition, catalog: Catalog) -> str:
    """The label table as markdown (the totals row in bold)."""
    header, rows = label_table_rows(partition, catalog)
    rows[-1][0] = "**all**"
    return table(header, rows, align="l" + "r" * (len(header) - 1)) + "\n"


_MULTILABEL_NOTE = (
    "Multi-label task: each image is counted once, under its first positive finding in task order "
    f"(or '{NO_FINDING}'); this is the label the partitioner splits by.\n\n"
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _checked_out_dir(out_dir: Path, overwrite: bool) -> Path:
    """The absolute output folder, refused when it holds anything but an earlier partition (or
    that, without ``overwrite``)."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output path {out_dir} exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError(f"output folder {out_dir} is not empty; choose another --out or pass --overwrite")
        if not (out_dir / "partition.json").is_file():
            raise DataError(
                f"output folder {out_dir} is not empty and holds no partition.json, so it is not an "
                "earlier partition; --overwrite only replaces those. Choose another --out"
            )
    return out_dir


def _write_site_manifests(tmp: Path, out_dir: Path, catalog: Catalog, partition: Partition) -> int:
    """One manifest per site under ``tmp`` (paths as they will be under ``out_dir``); images of
    sources without files are written as PNG. Returns how many images were written."""
    from PIL import Image

    written_images = 0
    for name, indices in zip(partition.site_names, partition.sites, strict=True):
        rows = [MANIFEST_HEADER]
        for i in indices.tolist():
            record = catalog.records[i]
            path = record_path(catalog, record)
            if path is None:
                relative = Path("images") / name / f"{i:06d}_{_UNSAFE.sub('_', record.key)[-80:]}.png"
                (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.asarray(catalog.read(i), dtype=np.uint8)).save(tmp / relative)
                path = out_dir / relative
                written_images += 1
            site = record.site or ""
            if partition.settings.partitioner == "natural" and partition.natural_ids is not None:
                site = _natural_key(record, partition.settings.natural_by or "site") or site
            rows.append(manifest_row(catalog, i, path, site))
        (tmp / f"{name}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return written_images


def _summary(
    catalog: Catalog,
    partition: Partition,
    counts: np.ndarray,
    source_paths: Mapping[str, str | None],
    source_options: Mapping[str, Mapping[str, str]] | None,
    written_images: int,
) -> dict[str, Any]:
    """The content of ``partition.json``: settings, sources, sizes, label counts and skew."""
    names = _label_names(catalog)
    return {
        "settings": partition.settings.to_dict(),
        "task": catalog.task.name,
        "labels": list(names),
        "sources": dict(source_paths),
        "source_options": {k: dict(v) for k, v in (source_options or {}).items()},
        "num_images": len(catalog),
        "sizes": dict(zip(partition.site_names, partition.sizes(), strict=True)),
        "label_counts": {
            site: dict(zip(names, map(int, row), strict=True))
            for site, row in zip(partition.site_names, counts, strict=True)
        },
        "label_skew_tv": label_skew(partition, catalog),
        "natural_ids": (
            dict(zip(partition.site_names, map(list, partition.natural_ids), strict=True))
            if partition.natural_ids is not None
            else None
        ),
        "images_written": written_images,
    }


def write_partition(
    out_dir: Path,
    catalog: Catalog,
    partition: Partition,
    *,
    source_paths: Mapping[str, str | None],
    source_options: Mapping[str, Mapping[str, str]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a partition's files into ``out_dir`` (all or nothing) and return its absolute path.

    Files: ``site_XX.csv`` per site (manifest format ``path,label,site,patient_id,view`` with
    absolute image paths, usable as ``cxr-fl-client --format manifest --data site_XX.csv``),
    ``partition.json`` (settings with the seed, source paths and options, sizes, per-site label
    counts, skew),
    ``label_distribution.md`` and ``label_distribution.png``. With ``overwrite``, an earlier
    partition folder (one holding ``partition.json``) is replaced. Images of sources without files
    (``synthetic``) are written as PNG under ``images/``. Everything is written to a temporary
    sibling folder first and moved into place at the end, so a failure leaves nothing behind.
    """
    from simulation.plots import plot_label_distribution

    out_dir = _checked_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        written_images = _write_site_manifests(tmp, out_dir, catalog, partition)
        counts = label_counts(partition, catalog)
        names = _label_names(catalog)
        summary = _summary(catalog, partition, counts, source_paths, source_options, written_images)
        (tmp / "partition.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (tmp / "label_distribution.md").write_text(
            f"# Label distribution ({partition.settings.partitioner}, {partition.num_sites} sites, "
            f"seed {partition.settings.seed})\n\n"
            + (_MULTILABEL_NOTE if catalog.task.is_multilabel else "")
            + label_table_markdown(partition, catalog),
            encoding="utf-8",
        )
        plot_label_distribution(
            counts,
            site_names=partition.site_names,
            label_names=names,
            path=tmp / "label_distribution.png",
            title=_plot_title(partition.settings),
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %d site manifests to %s", partition.num_sites, out_dir)
    return out_dir


def _plot_title(settings: PartitionSettings) -> str:
    extra = ""
    if settings.alpha is not None:
        extra = f", alpha={settings.alpha:g}"
    elif settings.classes_per_site is not None:
        extra = f", k={settings.classes_per_site}"
    return f"{settings.partitioner}{extra}, seed {settings.seed}"
