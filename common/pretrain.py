"""Public pretraining of the initial teacher at the coordinator (``cxr-fl-server pretrain``).

Private fine-tuning from a publicly pretrained model costs far less accuracy under DP-SGD than
training from random weights. The coordinator trains the run's teacher on public data it names
(any source format), with the sites' own training loop (:func:`common.local.train_round`, no
DP: the data are public), and writes

* the weights file (``torch.save`` of a state_dict, with ``FILE.sha256`` beside it), and
* ``FILE.json``: its weights hash (:func:`common.initial_teacher.weights_sha256`) and file
  SHA-256, task and classes, teacher architecture and norm, image size, each data source with
  its image count, the train/validation split, training settings, validation metrics, and the
  overlap check against the manifests it was told to stay clear of.

**Overlap.** Public sets re-publish each other's images, and a site's training pool or a held-out
test set may contain some of them. Each ``exclude`` manifest is read and decoded like the
pretraining data, and images with the same decoded pixels (the exact-duplicate hash of
:mod:`common.data.duplicates`) are reported; they are an error unless ``drop_overlap``, which
leaves them out of pretraining. Images re-encoded with a lossy codec are not caught (see there).

Nothing is written until training has finished: the files appear whole or not at all.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.checkpoint import metadata_path, save_model, sha256_file
from common.data.cache import CachedImages, build_cache
from common.data.catalog import Catalog
from common.data.sources import load_catalog
from common.data.sources.manifest import write_manifest
from common.data.splits import Split, split_by_patient
from common.device import Compute, resolve_compute
from common.errors import ConfigError, DataError
from common.initial_teacher import weights_sha256
from common.jsonio import write_json
from common.local import RoundOutcome, SiteData, derive_seed, evaluate_state, scalar_metrics, train_round
from common.progress import ProgressArg
from common.run_settings import FederatedRunConfig, RunSettings

logger = logging.getLogger(__name__)

SIDECAR_KIND = "cxr-fl pretrained teacher"


@dataclass(frozen=True)
class Overlap:
    """Pretraining images with an exact copy in one ``exclude`` manifest."""

    manifest: str
    manifest_images: int
    rows: tuple[int, ...]
    examples: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "manifest_images": self.manifest_images,
            "overlapping_images": len(self.rows),
            "examples": list(self.examples),
        }


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain_teacher` wrote and measured."""

    weights: Path
    sidecar: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_sha256(self) -> str:
        return str(self.metadata["weights_sha256"])


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse (ConfigError on ``--out``) an existing weights file unless ``overwrite``."""
    if out.is_dir():
        raise ConfigError("--out", str(out), "a file name for the weights (e.g. teacher.pt), not a folder")
    if not overwrite and (out.exists() or metadata_path(out).exists()):
        raise ConfigError("--out", str(out), "a new file name (it exists; pass --overwrite to replace it)")


def find_overlap(
    cached: CachedImages, manifests: Sequence[Path], cache_dir: Path, *, strict: bool = False
) -> list[Overlap]:
    """Exact copies (same decoded pixels) of ``manifests``' images among the cached pretraining images."""
    results = []
    ours: dict[str, list[int]] = {}
    for row, digest in enumerate(cached.pixel_hashes):
        ours.setdefault(digest, []).append(row)
    for manifest in manifests:
        catalog = load_catalog("manifest", manifest, cached.catalog.task, strict=strict)
        other = build_cache(catalog, cached.image_size, cache_dir, strict=strict)
        theirs = {digest: i for i, digest in enumerate(other.pixel_hashes)}
        rows = sorted(r for digest, rs in ours.items() if digest in theirs for r in rs)
        examples = []
        for row in rows[:3]:
            mine = cached.catalog.records[row]
            match = other.catalog.records[theirs[cached.pixel_hashes[row]]]
            examples.append(f"{mine.source}:{mine.key} = {manifest.name}:{match.key}")
        results.append(Overlap(str(manifest), len(other), tuple(rows), tuple(examples)))
        logger.info("overlap with %s: %d image(s)", manifest, len(rows))
    return results


@dataclass(frozen=True)
class PretrainingImages:
    """The decoded pretraining images, their train / held-out split and the overlap found."""

    cached: CachedImages
    split: Split
    overlaps: list[Overlap]
    overlapping: list[int]


def pretraining_images(
    catalog: Catalog,
    settings: FederatedRunConfig,
    *,
    cache_dir: Path,
    exclude: Sequence[Path] = (),
    drop_overlap: bool = False,
    strict: bool = False,
    on_decoded: Callable[[int, int], None] | None = None,
) -> PretrainingImages:
    """Decode ``catalog``, check it against ``exclude`` and split it as :func:`pretrain_teacher` does
    (the run's ``val-fraction`` and ``split-seed``, by patient): the same call gives the same split."""
    run = settings.run
    cached = build_cache(catalog, run.image_size, cache_dir, strict=strict, progress=on_decoded)
    if cached.skipped:
        logger.warning(
            "%d unreadable image(s) skipped (first: %s)", len(cached.skipped), cached.skipped[0].key
        )
    overlaps = find_overlap(cached, exclude, cache_dir, strict=strict)
    overlapping = sorted({r for o in overlaps for r in o.rows})
    split = _pretraining_split(cached, overlaps, overlapping, run, drop_overlap=drop_overlap)
    return PretrainingImages(cached, split, overlaps, overlapping)


def split_manifest_paths(weights: Path) -> tuple[Path, Path]:
    """``FILE.train.csv`` and ``FILE.holdout.csv``: the images a weights file was trained on and
    those it held out (e.g. the coordinator's ``central-eval-manifest``)."""
    return weights.with_name(f"{weights.name}.train.csv"), weights.with_name(f"{weights.name}.holdout.csv")


def write_split_manifests(weights: Path, images: PretrainingImages) -> dict[str, str]:
    """Write the train and held-out manifests beside ``weights``; their names for the sidecar, or
    nothing when the images have no files (a synthetic source)."""
    train, holdout = split_manifest_paths(weights)
    try:
        write_manifest(train, images.cached.catalog, images.split.train)
        write_manifest(holdout, images.cached.catalog, images.split.val)
    except DataError as exc:
        logger.info("no train / held-out manifests beside %s: %s", weights.name, exc)
        return {}
    return {"train_manifest": train.name, "holdout_manifest": holdout.name}


def _pretraining_split(
    cached: CachedImages,
    overlaps: Sequence[Overlap],
    overlapping: Sequence[int],
    run: RunSettings,
    *,
    drop_overlap: bool,
) -> Split:
    """The patient-grouped train / validation split of the pretraining images, without the images
    that copy an excluded set (refused unless ``drop_overlap``)."""
    if overlapping and not drop_overlap:
        worst = next(o for o in overlaps if o.rows)
        raise DataError(
            f"{len(overlapping)} pretraining image(s) are exact copies of images in {worst.manifest} "
            f"(e.g. {worst.examples[0]}); pretraining on them would leak that set into the initial "
            "teacher. Pass --drop-overlap to leave them out, or remove them from the sources"
        )
    split = split_by_patient(
        cached.catalog, val_fraction=run.val_fraction, test_fraction=0.0, seed=run.split_seed
    )
    if overlapping:
        split = replace(
            split,
            train=np.setdiff1d(split.train, overlapping),
            val=np.setdiff1d(split.val, overlapping),
        )
    if len(split.train) == 0:
        raise DataError("no pretraining images are left to train on; add images or lower val-fraction")
    return split


def _sidecar(
    settings: FederatedRunConfig,
    sources: Mapping[str, Mapping[str, Any]],
    cached: CachedImages,
    split: Split,
    overlaps: Sequence[Overlap],
    dropped_overlap: int,
    outcome: RoundOutcome,
    val_metrics: dict[str, float],
    epochs: int,
    seed: int,
    compute: Compute,
    seconds: float,
) -> dict[str, Any]:
    """The record written beside the pretrained weights (sources, split, training, validation)."""
    task, run = settings.task, settings.run
    records = cached.catalog.records
    used = Counter(records[i].source for i in np.concatenate([split.train, split.val]))
    metadata: dict[str, Any] = {
        "kind": SIDECAR_KIND,
        "weights_sha256": weights_sha256(outcome.state_dict),
        "task": task.name,
        "classes": list(task.classes),
        "num_outputs": task.num_classes,
        "teacher": {k: v for k, v in asdict(settings.teacher).items() if k != "weights"},
        "initialised_from": str(settings.teacher.weights) if settings.teacher.weights else None,
        "image_size": run.image_size,
        "sources": [
            {"id": source_id, **dict(info), "images": int(used.get(source_id, 0))}
            for source_id, info in sources.items()
        ],
        "images": {
            "train": len(split.train),
            "val": len(split.val),
            "skipped_unreadable": len(cached.skipped),
            "dropped_overlap": dropped_overlap,
        },
        "split": {"val_fraction": run.val_fraction, "split_seed": run.split_seed, "by": "patient"},
        "training": {
            "epochs": epochs,
            "batch_size": settings.train.batch_size,
            "optimizer": settings.train.optimizer,
            "lr": settings.train.lr,
            "momentum": settings.train.momentum,
            "weight_decay": settings.train.weight_decay,
            "freeze_blocks": settings.train.freeze_blocks,
            "seed": seed,
            "device": str(compute.device),
            "seconds": round(seconds, 1),
            "loss": outcome.metrics.get("loss"),
            "differential_privacy": False,
        },
        "val_metrics": val_metrics,
        "overlap_checks": [o.record() for o in overlaps],
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return metadata


def pretrain_teacher(
    catalog: Catalog,
    sources: Mapping[str, Mapping[str, Any]],
    settings: FederatedRunConfig,
    out: Path,
    *,
    epochs: int,
    cache_dir: Path,
    exclude: Sequence[Path] = (),
    drop_overlap: bool = False,
    strict: bool = False,
    progress: ProgressArg = None,
    on_cached: Callable[[int, int], None] | None = None,
    on_decoded: Callable[[int, int], None] | None = None,
) -> PretrainResult:
    """Train ``settings.teacher`` on ``catalog`` for ``epochs`` and write the weights and sidecar.

    ``sources``: ``{source id: {"format", "path", "options"}}`` for the record. The run's
    ``val-fraction`` and ``split-seed`` hold out a patient-grouped validation split (scored,
    not trained on); training uses the run's batch size, optimiser, learning rate, seed, device
    and ``freeze-blocks``, without DP. ``on_cached(train_images, val_images)`` is called once the
    data are ready (before training); ``on_decoded(done, total)`` after each decoded image.

    Raises:
        ConfigError: bad ``epochs``.
        DataError: overlap with an ``exclude`` manifest (without ``drop_overlap``), or no
            training images.
    """
    if epochs < 1:
        raise ConfigError("--epochs", epochs, "an integer >= 1")
    task = settings.task
    images = pretraining_images(
        catalog,
        settings,
        cache_dir=cache_dir,
        exclude=exclude,
        drop_overlap=drop_overlap,
        strict=strict,
        on_decoded=on_decoded,
    )
    cached, split, overlaps, overlapping = images.cached, images.split, images.overlaps, images.overlapping
    if on_cached is not None:
        on_cached(len(split.train), len(split.val))
    data = SiteData(cached, split, settings.run.preprocess_equalize, settings.run.augment)
    compute = resolve_compute(settings.compute)
    seed = derive_seed(settings.train.seed, "pretrain")
    started = time.perf_counter()
    outcome = train_round(
        data,
        task,
        settings.teacher,
        None,
        replace(settings.train, local_epochs=epochs, proximal_mu=0.0),
        seed=seed,
        progress=progress,
        compute=compute,
    )
    seconds = time.perf_counter() - started
    val_metrics: dict[str, float] = {}
    if len(split.val):
        result = evaluate_state(data, "val", task, settings.teacher, outcome.state_dict, compute=compute)
        val_metrics = scalar_metrics(result, "val_")
    metadata = _sidecar(
        settings,
        sources,
        cached,
        split,
        overlaps,
        len(overlapping),
        outcome,
        val_metrics,
        epochs,
        seed,
        compute,
        seconds,
    )
    return _write_outputs(out, outcome.state_dict, metadata, images)


def _write_outputs(
    out: Path, state: Mapping[str, Any], metadata: dict[str, Any], images: PretrainingImages
) -> PretrainResult:
    """The weights, the train / held-out manifests beside them, and the sidecar last."""
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(dict(state), out)
    metadata["split"].update(write_split_manifests(out, images))
    metadata["file_sha256"] = sha256_file(out)
    sidecar = metadata_path(out)
    write_json(sidecar, metadata)
    return PretrainResult(out, sidecar, metadata)
