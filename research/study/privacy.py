"""The privacy table's product settings (issue 18): public pretraining at the coordinator, then DP.

``[privacy.pretrain]`` of the study's TOML file describes the coordinator's public data: images
of the study's own public sources that are in neither the training pool nor the held-out test
set, by file and by patient, drawn with ``holdout-seed``. The initial teacher is trained on them
with ``cxr-fl-server pretrain``'s routine (:func:`common.pretrain.pretrain_teacher`), which also
runs the exact-duplicate check against the pool and the test set and leaves any copy out; the
weights, their sidecar (overlap counts included) and the manifest stay in ``<out>/pretrain/``
and are made once.

Each ``[[privacy.variants]]`` is a product setting of the privacy table: for each of its seeds,
a GroupNorm teacher without DP and one with DP-SGD at the headline epsilon, both with the
variant's run settings (and the pretrained initial teacher when ``pretrained = true``), so the
cost of DP is measured against the same recipe without DP. ``privacy.headline-variant`` names
the variant whose DP row ``targets.dp_cost`` judges ("" = the plain rows).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from common.errors import ConfigError, DataError
from common.run_settings import parse_bool
from research.study.external import check_keys, check_name, parse_seeds

VARIANT_KEYS = {"name", "about", "pretrained", "run", "seeds"}
PRETRAIN_KEYS = {"images", "epochs"}
PUBLIC_MANIFEST = "public.csv"
PUBLIC_SCORES_FILE = "held_out_scores.json"  # the public teacher alone on the held-out test set


@dataclass(frozen=True)
class PretrainSettings:
    """How much public data the coordinator pretrains on, and for how long."""

    images: int = 3000
    epochs: int = 4


@dataclass(frozen=True)
class PrivacyVariant:
    """A product setting of the privacy table: a no-DP and a DP teacher with these settings."""

    name: str
    about: str
    pretrained: bool = False
    run: tuple[tuple[str, Any], ...] = ()
    seeds: tuple[int, ...] | None = None  # None: all the study's seeds


def parse_pretrain(raw: Any, path: Path) -> PretrainSettings:
    if raw is None:
        return PretrainSettings()
    if not isinstance(raw, dict):
        raise ConfigError(f"'privacy.pretrain' in {path}", raw, "a [privacy.pretrain] table")
    check_keys(raw, PRETRAIN_KEYS, "privacy.pretrain.", path)
    values = {}
    for key, default in (("images", 3000), ("epochs", 4)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"key 'privacy.pretrain.{key}' in {path}", value, "an integer >= 1")
        values[key] = value
    return PretrainSettings(**values)


def parse_variants(
    raw: Any, run: Mapping[str, Any], path: Path, check_run_config: Callable[[dict[str, Any]], Any]
) -> tuple[PrivacyVariant, ...]:
    """The ``[[privacy.variants]]`` tables, checked (names, run settings, seeds' shape) before any work."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"'privacy.variants' in {path}", raw, "[[privacy.variants]] tables")
    variants: list[PrivacyVariant] = []
    for i, table in enumerate(raw):
        where = f"privacy.variants[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} in {path}", table, "a table with name, about, pretrained, run, seeds")
        check_keys(table, VARIANT_KEYS, f"{where}.", path)
        name = check_name(table.get("name"), f"{where}.name in {path}")
        if name in {v.name for v in variants}:
            raise ConfigError(f"{where}.name in {path}", name, "a name no other variant has")
        changed = table.get("run", {})
        if not isinstance(changed, dict):
            raise ConfigError(f"{where}.run in {path}", changed, "an inline table of run settings")
        for key in ("teacher-weights", "teacher-norm", "dp-enabled", "dp-target-epsilon"):
            if key in changed:
                raise ConfigError(
                    f"{where}.run.{key} in {path}",
                    changed[key],
                    "left out: the privacy table sets it (pretrained = true names the public teacher)",
                )
        check_run_config({**run, **changed, "teacher-norm": "group"})
        pretrained = parse_bool(f"key '{where}.pretrained' in {path}", table.get("pretrained", False))
        if not pretrained and not changed:
            raise ConfigError(f"{where} in {path}", name, "pretrained = true or the run settings it changes")
        seeds = parse_seeds(table.get("seeds"), f"{where}.seeds in {path}")
        variants.append(
            PrivacyVariant(
                name=name,
                about=str(table.get("about", "")),
                pretrained=pretrained,
                run=tuple(sorted(changed.items())),
                seeds=seeds,
            )
        )
    return tuple(variants)


def public_weights(out: Path, teacher: str) -> Path:
    """Where the study keeps the coordinator's pretrained GroupNorm teacher."""
    return out / "pretrain" / f"public-group-{teacher}.pt"


class StartsFromPublicTeacher(Protocol):
    """A privacy variant or an attempt: run settings it changes, and whether it starts from the
    coordinator's public teacher."""

    @property
    def run(self) -> tuple[tuple[str, Any], ...]: ...

    @property
    def pretrained(self) -> bool: ...


def variant_overrides(
    variant: StartsFromPublicTeacher, out: Path, teacher: str, *, coordinator_holdout: bool = False
) -> tuple[tuple[str, Any], ...]:
    """The run settings a variant's (or an attempt's) cells change (the public teacher's file when
    pretrained; with ``coordinator_holdout``, an attempt's, the coordinator selects on the images
    that teacher held out and distils the students' start on those it trained on)."""
    changed = dict(variant.run)
    if variant.pretrained:
        changed["teacher-weights"] = str(public_weights(out, teacher))
    if coordinator_holdout:
        from common.pretrain import split_manifest_paths

        train, holdout = split_manifest_paths(public_weights(out, teacher))
        changed |= {"kd-public-manifest": str(train), "central-eval-manifest": str(holdout)}
        changed["select-on"] = "coordinator"
    return tuple(sorted(changed.items()))


def _used(manifests: list[Path]) -> tuple[set[str], set[str]]:
    paths: set[str] = set()
    patients: set[str] = set()
    for manifest in manifests:
        with manifest.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                paths.add(str(Path(row["path"]).resolve()))
                if row.get("patient_id"):
                    patients.add(row["patient_id"])
    return paths, patients


def public_indices(catalog: Any, exclude: list[Path], images: int, seed: int) -> list[int]:
    """Images of ``catalog`` sharing no file or patient with the ``exclude`` manifests, drawn by ``seed``.

    Exact copies under other names are not caught here: the pretraining routine's duplicate
    check does that (and drops them), so both kinds of overlap are handled and reported.
    """
    from common.data.sources.manifest import record_path

    used_paths, used_patients = _used(exclude)
    keep = []
    for i, record in enumerate(catalog.records):
        path = record_path(catalog, record)
        if path is None or str(path.resolve()) in used_paths:
            continue
        if record.patient_id and record.patient_id in used_patients:
            continue
        keep.append(i)
    random.Random(seed).shuffle(keep)
    return sorted(keep[:images])


def ensure_public_teacher(settings: Any, pool: Path, test: Path) -> Path:
    """Write the public manifest and pretrain the coordinator's teacher once; return the weights file.

    ``settings`` is the study's (:class:`research.study.cells.StudySettings`); the teacher uses the
    study's ``[run]`` settings with GroupNorm (DP sites fine-tune it), never DP.
    """
    from common.checkpoint import metadata_path
    from common.data.sources.manifest import write_manifest
    from common.pretrain import pretrain_teacher
    from common.run_settings import check_run_config, run_settings_from_config
    from simulation.sources import load_sources

    dataset = settings.datasets["cxr"]
    weights = public_weights(settings.out, str(settings.run["teacher-name"]))
    run_settings = run_settings_from_config(
        check_run_config({**settings.run, "task": dataset.task, "teacher-norm": "group"})
    )
    if weights.is_file() and metadata_path(weights).is_file():
        ensure_split_manifests(weights, run_settings, settings.out / "cache", [pool, test])
        return weights
    folder = weights.parent
    folder.mkdir(parents=True, exist_ok=True)
    catalog, _, _ = load_sources(
        [s.fmt for s in dataset.sources],
        [s.path for s in dataset.sources],
        dataset.task,
        option_pairs=[f"{s.fmt}.{k}={v}" for s in dataset.sources for k, v in s.options.items()],
    )
    chosen = public_indices(catalog, [pool, test], settings.pretrain.images, settings.holdout_seed)
    if not chosen:
        raise DataError(
            "no public images are left outside the study's pool and held-out test set; lower "
            "pool-images/test-images or privacy.pretrain.images"
        )
    manifest = write_manifest(folder / PUBLIC_MANIFEST, catalog, chosen)
    public, paths, options = load_sources(["manifest"], [manifest], dataset.task)
    sources = {sid: {"format": "manifest", "path": paths[sid], "options": options[sid]} for sid in paths}
    # the weights are written atomically, the sidecar last: a file without its sidecar is made again
    pretrain_teacher(
        public,
        sources,
        run_settings,
        weights,
        epochs=settings.pretrain.epochs,
        cache_dir=settings.out / "cache",
        exclude=[pool, test],
        drop_overlap=True,
    )
    return weights


def ensure_split_manifests(weights: Path, run_settings: Any, cache_dir: Path, exclude: list[Path]) -> None:
    """The public teacher's train and held-out manifests (``cxr-fl-server pretrain`` writes them;
    a teacher pretrained before it did gets them from the same split, without training again)."""
    from common.pretrain import pretraining_images, split_manifest_paths, write_split_manifests
    from simulation.sources import load_sources

    if all(path.is_file() for path in split_manifest_paths(weights)):
        return
    public, _, _ = load_sources(["manifest"], [weights.parent / PUBLIC_MANIFEST], run_settings.task.name)
    images = pretraining_images(public, run_settings, cache_dir=cache_dir, exclude=exclude, drop_overlap=True)
    write_split_manifests(weights, images)
