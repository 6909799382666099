"""The real-data study: federation vs pooling, the cost of DP, and distilled students, on public CXRs.

``python -m research.study TABLE --config research/study/study.toml`` runs one table of the study;
``report`` turns the finished cells into ``benchmarks/results/study.md`` and its plots.

How the data are used (settings in the TOML file, recorded with every result):

1. ``prepare`` (run by every table on first use): the sources are read, exact duplicate images
   dropped, and a patient-grouped, label-stratified **held-out test set** is set aside once
   (``holdout-seed``). A **pool** of training images is drawn from the rest (also by patient).
   Both are written as manifests; every teacher and student of the study is scored on the same
   held-out images, which no site and no baseline ever trains on.
2. A **cell** is one simulated federation on the pool (``simulation.experiment.Experiment``:
   partition, Flower simulation runtime, distillation), followed by the baselines the table needs
   (pooled teacher on the union of the sites' training splits, local-only teachers per site, both
   with the federated teacher's epoch budget) and the held-out scoring of every model.
   A finished cell writes ``cells/<name>/result.json``; a table re-run skips finished cells, so an
   interrupted table resumes where it stopped.

Tables (each its own command): ``splits`` (IID, Dirichlet 0.5 / 0.1, natural split by source;
pooled, local-only, FedAvg, FedProx), ``headline`` (the rows the targets are judged on, over
several seeds, with KD and no-KD students), ``privacy`` (DP-SGD at every site at each epsilon vs
the same GroupNorm teacher without DP), ``students`` (the federated student: the sites' KD
students averaged over extra rounds), ``nih`` (NIH ChestX-ray14, 14 findings, a small-sample
multi-label check) and ``attempts`` (the ``[[attempts]]`` of the TOML file: cells with some run
settings changed, tried for the targets the study's settings miss, on their own seeds or the first
and on their ``split`` or ``splits``; the ``[recipe]`` table names the two attempts that set the
product's recipe beside the old one, scored at each site's operating point: research/study/recipe.py)
and ``external`` (leave one source out: the ``[external]`` holdouts of the TOML file, each cell
trained without one source and scored on it with bootstrap intervals; research/study/external.py).
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from common.checkpoint import load_model_state
from common.data.sources.manifest import write_manifest
from common.data.splits import split_by_patient
from common.errors import ConfigError, DataError
from common.jsonio import write_json
from common.local import (
    EVAL_BATCH_SIZE,
    build_loaded_model,
    derive_seed,
    load_eval_dataset,
    scalar_metrics,
    site_data_request,
    student_config,
)
from common.run_settings import check_run_config, coerce, parse_bool, read_toml, run_settings_from_config
from common.tasks import get_task
from common.training import evaluate
from research.study.external import (
    ExternalSettings,
    check_keys,
    check_name,
    parse_external,
    parse_seeds,
    score_external_cell,
    split_external,
)
from research.study.privacy import (
    PUBLIC_SCORES_FILE,
    PretrainSettings,
    PrivacyVariant,
    ensure_public_teacher,
    parse_pretrain,
    parse_variants,
    public_weights,
    variant_overrides,
)
from research.study.sites import score_site
from simulation.baselines import PooledData, load_sites, train_baseline
from simulation.experiment import (
    Experiment,
    ExperimentConfig,
    PartitionSpec,
    SourceSpec,
)
from simulation.sources import drop_duplicate_images, load_sources

logger = logging.getLogger(__name__)

TABLES = ("splits", "headline", "privacy", "students", "nih", "attempts", "external")
SPLITS = ("iid", "dirichlet-0.5", "dirichlet-0.1", "natural")
DATASETS = ("cxr", "nih")


@dataclass(frozen=True)
class SourceSetting:
    fmt: str
    path: Path
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSetting:
    """One data set of the study: its sources, task, and how much is held out and pooled."""

    task: str
    sources: tuple[SourceSetting, ...]
    test_images: int
    pool_images: int
    drop_duplicates: bool = True


@dataclass(frozen=True)
class Attempt:
    """A variant of a headline cell tried for a missed target: the cell with ``run`` changed."""

    name: str
    about: str
    splits: tuple[str, ...] = ("dirichlet-0.5",)
    kd: bool = False
    pooled: bool = False
    federated_student: bool = False
    run: tuple[tuple[str, Any], ...] = ()
    seeds: tuple[int, ...] | None = None  # None: the study's first seed
    pretrained: bool = False
    """Start from the coordinator's public (GroupNorm) teacher of ``[privacy.pretrain]``."""
    coordinator_holdout: bool = False
    """The coordinator picks the delivered teacher and federated student on the public images its
    teacher held out (``select-on = "coordinator"``) and distils the students' start on the rest."""


@dataclass(frozen=True)
class Recipe:
    """The ``[recipe]`` table: the attempts that hold the product's recipe (``new``) and the old one
    it replaced (``old``), set side by side under label skew (study_report.py's recipe section)."""

    new: str = ""
    old: str = ""
    natural: str = ""
    """The attempt whose natural-split cells the natural_covid_* targets read ("" = ``new``): a
    recipe for the split where each site holds one class, when it differs from the label-skew one."""

    @property
    def natural_attempt(self) -> str:
        return self.natural or self.new


@dataclass(frozen=True)
class StudySettings:
    """Everything in the study's TOML file, resolved (paths absolute)."""

    config_file: Path
    out: Path
    results: Path
    datasets: dict[str, DatasetSetting]
    run: dict[str, Any]
    sites: int = 5
    nih_sites: int = 3
    min_site_size: int = 40
    holdout_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    proximal_mu: float = 0.01
    dp_epsilons: tuple[float, ...] = (8.0, 3.0)
    dp_headline_epsilon: float = 8.0
    dp_delta: float = 1e-5
    dp_run: dict[str, Any] = field(default_factory=dict)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    privacy_variants: tuple[PrivacyVariant, ...] = ()
    dp_headline_variant: str = ""  # the [[privacy.variants]] whose DP row targets.dp_cost judges
    federated_student_rounds: int = 5
    attempts: tuple[Attempt, ...] = ()
    recipe: Recipe = field(default_factory=Recipe)
    external: ExternalSettings = field(default_factory=ExternalSettings)
    # where the cells' simulated sites run (command line only; they do not change results)
    gpus_per_site: float = 0.0
    cpus_per_site: int = 1
    ray_address: str = ""


TOP_KEYS = {
    "out",
    "results",
    "sites",
    "nih-sites",
    "min-site-size",
    "holdout-seed",
    "seeds",
    "proximal-mu",
    "federated-student-rounds",
    "run",
    "privacy",
    "data",
    "attempts",
    "external",
    "recipe",
}
ATTEMPT_KEYS = {
    "name",
    "about",
    "split",
    "splits",
    "kd",
    "pooled",
    "federated-student",
    "pretrained",
    "coordinator-holdout",
    "run",
    "seeds",
}
PRIVACY_KEYS = {"epsilons", "headline-epsilon", "delta", "run", "pretrain", "variants", "headline-variant"}
DATASET_KEYS = {"task", "sources", "test-images", "pool-images", "drop-duplicates"}


def load_settings(config_file: Path) -> StudySettings:
    """Read and check the study's TOML file (paths are relative to the file's folder)."""

    path = Path(config_file).expanduser().resolve()
    raw = read_toml(path, what="an existing TOML file (e.g. research/study/study.toml)")
    check_keys(raw, TOP_KEYS, "", path)
    base = path.parent
    datasets: dict[str, DatasetSetting] = {}
    for name, table in raw.get("data", {}).items():
        if name not in DATASETS:
            raise ConfigError(f"table 'data.{name}' in {path}", name, "one of " + ", ".join(DATASETS))
        check_keys(table, DATASET_KEYS, f"data.{name}.", path)
        sources = tuple(
            SourceSetting(
                str(s["format"]),
                (base / str(s["path"])).resolve(),
                {k: str(v) for k, v in s.get("options", {}).items()},
            )
            for s in table.get("sources", [])
        )
        if not sources:
            raise ConfigError(
                f"data.{name}.sources in {path}", "[]", "at least one source with format and path"
            )
        datasets[name] = DatasetSetting(
            task=str(table["task"]),
            sources=sources,
            test_images=coerce(f"key 'test-images' in {path}", table["test-images"], int),
            pool_images=coerce(f"key 'pool-images' in {path}", table["pool-images"], int),
            drop_duplicates=parse_bool(
                f"key 'drop-duplicates' in {path}", table.get("drop-duplicates", True)
            ),
        )
    for name in DATASETS:
        if name not in datasets:
            raise ConfigError(f"table 'data.{name}' in {path}", "missing", "a [data." + name + "] table")
    privacy = raw.get("privacy", {})
    check_keys(privacy, PRIVACY_KEYS, "privacy.", path)
    run = dict(raw.get("run", {}))
    check_run_config(run)  # unknown keys and bad values fail here, before any work
    settings = StudySettings(
        config_file=path,
        out=(base / str(raw.get("out", "../runs/study"))).resolve(),
        results=(base / str(raw.get("results", "results"))).resolve(),
        datasets=datasets,
        run=run,
        sites=coerce(f"key 'sites' in {path}", raw.get("sites", 5), int),
        nih_sites=coerce(f"key 'nih-sites' in {path}", raw.get("nih-sites", 3), int),
        min_site_size=coerce(f"key 'min-site-size' in {path}", raw.get("min-site-size", 40), int),
        holdout_seed=coerce(f"key 'holdout-seed' in {path}", raw.get("holdout-seed", 0), int),
        seeds=tuple(int(s) for s in raw.get("seeds", (0, 1, 2))),
        proximal_mu=coerce(f"key 'proximal-mu' in {path}", raw.get("proximal-mu", 0.01), float),
        federated_student_rounds=coerce(
            f"key 'federated-student-rounds' in {path}", raw.get("federated-student-rounds", 5), int
        ),
        dp_epsilons=tuple(float(e) for e in privacy.get("epsilons", (8.0, 3.0))),
        dp_headline_epsilon=coerce(
            f"key 'headline-epsilon' in {path}", privacy.get("headline-epsilon", 8.0), float
        ),
        dp_delta=coerce(f"key 'delta' in {path}", privacy.get("delta", 1e-5), float),
        dp_run=dict(privacy.get("run", {})),
        pretrain=parse_pretrain(privacy.get("pretrain"), path),
        privacy_variants=parse_variants(privacy.get("variants"), run, path, check_run_config),
        dp_headline_variant=str(privacy.get("headline-variant", "")),
        attempts=_attempts(raw.get("attempts", []), run, path),
        recipe=_recipe(raw.get("recipe"), raw.get("attempts", []), path),
        external=parse_external(raw.get("external"), str(datasets["cxr"].task), run, path, check_run_config),
    )
    # every table that names its own seeds names some of the study's
    own_seeds = [
        (f"external.seeds in {path}", settings.external.seeds),
        *((f"seeds of the attempt '{a.name}' in {path}", a.seeds) for a in settings.attempts),
        *((f"seeds of the privacy variant '{v.name}' in {path}", v.seeds) for v in settings.privacy_variants),
    ]
    for where, seeds in own_seeds:
        if seeds is not None and not set(seeds) <= set(settings.seeds):
            raise ConfigError(where, list(seeds), "some of the study's seeds")
    if settings.sites < 2 or settings.nih_sites < 2:
        raise ConfigError("sites / nih-sites", (settings.sites, settings.nih_sites), "at least 2 sites")
    if not settings.seeds:
        raise ConfigError("seeds", "[]", "at least one seed")
    if settings.federated_student_rounds < 1:
        raise ConfigError("federated-student-rounds", settings.federated_student_rounds, "an integer >= 1")
    variant_names = [v.name for v in settings.privacy_variants]
    if settings.dp_headline_variant and settings.dp_headline_variant not in variant_names:
        raise ConfigError(
            "privacy.headline-variant",
            settings.dp_headline_variant,
            "one of the [[privacy.variants]] names (" + ", ".join(variant_names) + ') or ""',
        )
    if settings.dp_headline_epsilon not in settings.dp_epsilons:
        raise ConfigError("privacy.headline-epsilon", settings.dp_headline_epsilon, "one of privacy.epsilons")
    check_run_config({**run, **settings.dp_run, "dp-enabled": True, "teacher-norm": "group"})
    return settings


def _attempts(raw: Any, run: Mapping[str, Any], path: Path) -> tuple[Attempt, ...]:
    """The ``[[attempts]]`` tables, checked (names, splits and run settings) before any work."""

    if not isinstance(raw, list):
        raise ConfigError(f"'attempts' in {path}", raw, "[[attempts]] tables")
    attempts: list[Attempt] = []
    for i, table in enumerate(raw):
        where = f"attempts[{i}]."
        check_keys(table, ATTEMPT_KEYS, where, path)
        name = check_name(table.get("name"), f"{where}name in {path}")
        if name in {a.name for a in attempts}:
            raise ConfigError(f"{where}name in {path}", name, "a name no other attempt has")
        splits = _attempt_splits(table, where, path)
        changed = dict(table.get("run", {}))
        if not changed:
            raise ConfigError(f"{where}run in {path}", "{}", "the run settings the attempt changes")
        check_run_config({**run, **changed})
        pretrained = parse_bool(f"key '{where}pretrained' in {path}", table.get("pretrained", False))
        if pretrained and changed.get("teacher-norm") != "group":
            raise ConfigError(
                f"{where}run.teacher-norm in {path}",
                changed.get("teacher-norm", run.get("teacher-norm", "batch")),
                '"group": pretrained = true starts from the coordinator\'s public GroupNorm teacher',
            )
        key = f"key '{where}coordinator-holdout' in {path}"
        holdout = parse_bool(key, table.get("coordinator-holdout", False))
        if holdout and not pretrained:
            raise ConfigError(
                f"{where}coordinator-holdout in {path}",
                holdout,
                "false, or pretrained = true (the hold-out is the part of the public images the "
                "coordinator's teacher was not trained on)",
            )
        seeds = parse_seeds(table.get("seeds"), f"{where}seeds in {path}")
        attempts.append(
            Attempt(
                name=name,
                about=str(table.get("about", "")),
                splits=splits,
                kd=parse_bool(f"key 'kd' in {path}", table.get("kd", False)),
                pooled=parse_bool(f"key 'pooled' in {path}", table.get("pooled", False)),
                federated_student=parse_bool(
                    f"key 'federated-student' in {path}", table.get("federated-student", False)
                ),
                run=tuple(sorted(changed.items())),
                seeds=seeds,
                pretrained=pretrained,
                coordinator_holdout=holdout,
            )
        )
    return tuple(attempts)


def _attempt_splits(table: Mapping[str, Any], where: str, path: Path) -> tuple[str, ...]:
    """An attempt's ``split`` (one) or ``splits`` (several; the cells run split by split)."""
    if "split" in table and "splits" in table:
        raise ConfigError(f"{where}splits in {path}", table["splits"], "either split or splits, not both")
    key = "splits" if "splits" in table else "split"
    raw = table.get(key, "dirichlet-0.5")
    splits = tuple(str(s) for s in raw) if key == "splits" and isinstance(raw, list) else (str(raw),)
    if not splits or len(set(splits)) != len(splits) or any(s not in SPLITS for s in splits):
        raise ConfigError(f"{where}{key} in {path}", raw, "one or more distinct of " + ", ".join(SPLITS))
    return splits


def _recipe(raw: Any, attempts: Any, path: Path) -> Recipe:
    """The ``[recipe]`` table: ``new`` and ``old`` name attempts of the file (checked)."""
    if raw is None:
        return Recipe()
    if not isinstance(raw, dict):
        raise ConfigError(f"'recipe' in {path}", raw, "a table with keys new and old")
    check_keys(raw, {"new", "old", "natural"}, "recipe.", path)
    names = [str(a.get("name")) for a in attempts if isinstance(a, dict)]
    recipe = Recipe(**{key: str(raw.get(key, "")) for key in ("new", "old", "natural")})
    for key, name in (("new", recipe.new), ("old", recipe.old), ("natural", recipe.natural_attempt)):
        if name not in names:
            raise ConfigError(f"recipe.{key} in {path}", name, "the name of one of the [[attempts]]")
    return recipe


# ----------------------------------------------------------------------------- held-out test + pool


@dataclass(frozen=True)
class PreparedData:
    pool: Path
    test: Path
    info: dict[str, Any]


def _check_sources(dataset: DatasetSetting) -> None:
    for source in dataset.sources:
        if not source.path.exists():
            raise DataError(
                f"data source '{source.fmt}' not found at {source.path}: the study reads the public sets "
                "in ../shared/data (see its README); fix the path in the study's TOML file"
            )


def prepare(settings: StudySettings, name: str) -> PreparedData:
    """The held-out test set and the training pool of one data set (written once, then reused)."""

    folder = settings.out / "data" / name
    info_path = folder / "holdout.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        return PreparedData(folder / "pool.csv", folder / "test.csv", info)
    dataset = settings.datasets[name]
    _check_sources(dataset)
    catalog, source_paths, _ = load_sources(
        [s.fmt for s in dataset.sources],
        [s.path for s in dataset.sources],
        dataset.task,
        option_pairs=[f"{s.fmt}.{k}={v}" for s in dataset.sources for k, v in s.options.items()],
    )
    read = len(catalog)
    if dataset.drop_duplicates:
        catalog = drop_duplicate_images(catalog, settings.out / "cache")
    n = len(catalog)
    if dataset.test_images + dataset.pool_images > n:
        raise ConfigError(
            f"data.{name}: test-images + pool-images",
            dataset.test_images + dataset.pool_images,
            f"at most the {n} distinct readable images",
        )
    # Patient-grouped and label-stratified: "val" is the held-out test; the pool is "test" (the
    # rest unused) or, when test and pool take every image, "train".
    whole = dataset.test_images + dataset.pool_images == n
    split = split_by_patient(
        catalog,
        val_fraction=dataset.test_images / n,
        test_fraction=0.0 if whole else dataset.pool_images / n,
        seed=settings.holdout_seed,
    )
    pool = split.train if whole else split.test
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder / "test.csv", catalog, split.val)
    write_manifest(folder / "pool.csv", catalog, pool)
    info = {
        "task": dataset.task,
        "sources": {k: v for k, v in source_paths.items()},
        "images_read": read,
        "images_distinct": n,
        "duplicates_dropped": read - n,
        "test": _label_counts(catalog, split.val),
        "pool": _label_counts(catalog, pool),
        "unused": 0 if whole else len(split.train),
        "holdout_seed": settings.holdout_seed,
        "patient_grouped": True,
    }
    write_json(info_path, info)
    return PreparedData(folder / "pool.csv", folder / "test.csv", info)


def _label_counts(catalog: Any, indices: np.ndarray) -> dict[str, int]:
    targets = np.nan_to_num(catalog.targets[indices], nan=0.0)
    counts = {c: int(v) for c, v in zip(catalog.task.classes, targets.sum(axis=0), strict=True)}
    return {"images": len(indices), **counts}


def distinct_sites(manifest: Path) -> int:
    with manifest.open(newline="", encoding="utf-8") as handle:
        return len({row["site"] for row in csv.DictReader(handle)})


# ----------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One simulated federation of the study and the extra models scored with it."""

    table: str
    dataset: str
    split: str
    strategy: str
    seed: int
    kd: bool = False
    pooled: bool = False
    local: bool = False
    dp_epsilon: float | None = None
    norm: str = "batch"
    federated_student: bool = False
    variant: str = ""  # an attempt's name; its run settings changes are ``overrides``
    overrides: tuple[tuple[str, Any], ...] = ()
    holdout: str = ""  # the external table: the slice left out of training (an [[external.holdouts]] name)

    @property
    def name(self) -> str:
        dp = f"-dp{self.dp_epsilon:g}" if self.dp_epsilon is not None else ""
        norm = "-gn" if self.norm == "group" and self.dp_epsilon is None else ""
        student = "-fedstudent" if self.federated_student else ""
        variant = f"-{self.variant}" if self.variant else ""
        holdout = f"-without-{self.holdout}" if self.holdout else ""
        return (
            f"{self.dataset}-{self.split}-{self.strategy}{dp}{norm}{student}{variant}{holdout}-s{self.seed}"
        )

    @property
    def base(self) -> Cell:
        """The cell an attempt varies (the cell itself when it is not an attempt)."""
        return replace(self, variant="", overrides=())


def table_cells(table: str, settings: StudySettings) -> list[Cell]:
    """The cells of one table (cells shared between tables have the same name and run once)."""
    first = settings.seeds[0]
    if table == "splits":
        cells = []
        for split in SPLITS:
            cells.append(
                Cell(
                    table,
                    "cxr",
                    split,
                    "fedavg",
                    first,
                    kd=split == "dirichlet-0.5",
                    pooled=split == "dirichlet-0.5",
                    local=True,
                )
            )
            cells.append(Cell(table, "cxr", split, "fedprox", first))
        return cells
    if table == "headline":
        cells = []
        for seed in settings.seeds:
            cells.append(
                Cell(table, "cxr", "dirichlet-0.5", "fedavg", seed, kd=True, pooled=True, local=True)
            )
            cells.append(Cell(table, "cxr", "natural", "fedavg", seed, local=True))
        return cells
    if table == "privacy":
        cells = []
        for seed in settings.seeds:
            cells.append(Cell(table, "cxr", "dirichlet-0.5", "fedavg", seed, norm="group"))
            for epsilon in settings.dp_epsilons:
                if epsilon == settings.dp_headline_epsilon or seed == first:
                    cells.append(
                        Cell(table, "cxr", "dirichlet-0.5", "fedavg", seed, dp_epsilon=epsilon, norm="group")
                    )
        teacher = str(settings.run.get("teacher-name", ""))
        # each variant: its no-DP reference, then DP at the headline epsilon
        for variant in settings.privacy_variants:
            overrides = variant_overrides(variant, settings.out, teacher)
            for seed in settings.seeds if variant.seeds is None else variant.seeds:
                if seed not in settings.seeds:
                    continue
                for variant_epsilon in (None, settings.dp_headline_epsilon):
                    cells.append(
                        Cell(
                            table,
                            "cxr",
                            "dirichlet-0.5",
                            "fedavg",
                            seed,
                            dp_epsilon=variant_epsilon,
                            norm="group",
                            variant=variant.name,
                            overrides=overrides,
                        )
                    )
        return cells
    if table == "students":
        return [
            Cell(table, "cxr", "dirichlet-0.5", "fedavg", seed, kd=True, federated_student=True)
            for seed in settings.seeds
        ]
    if table == "nih":
        return [Cell(table, "nih", "iid", "fedavg", first, kd=True, pooled=True)]
    if table == "attempts":  # each attempt on those of its seeds that run (--seed), else the first
        teacher = str(settings.run.get("teacher-name", ""))
        return [
            Cell(
                table,
                "cxr",
                split,
                "fedavg",
                seed,
                kd=a.kd,
                pooled=a.pooled,
                federated_student=a.federated_student,
                variant=a.name,
                overrides=variant_overrides(
                    a, settings.out, teacher, coordinator_holdout=a.coordinator_holdout
                ),
            )
            for a in settings.attempts
            for split in a.splits
            for seed in ((first,) if a.seeds is None else [s for s in a.seeds if s in settings.seeds])
        ]
    if table == "external":  # each holdout with the study's settings, then with each variant's
        external = settings.external
        seeds = (first,) if external.seeds is None else [s for s in external.seeds if s in settings.seeds]
        variants = [("", ()), *((v.name, v.run) for v in external.variants)]
        return [
            Cell(
                table,
                "cxr",
                "dirichlet-0.5",
                "fedavg",
                seed,
                kd=True,
                federated_student=True,
                variant=variant,
                overrides=overrides,
                holdout=h.name,
            )
            for variant, overrides in variants
            for h in external.holdouts
            for seed in seeds
        ]
    raise ConfigError("table", table, "one of " + ", ".join(TABLES))


def _partition_spec(cell: Cell, settings: StudySettings) -> Any:
    sites = settings.nih_sites if cell.dataset == "nih" else settings.sites
    common: dict[str, Any] = {"seed": cell.seed, "min_site_size": settings.min_site_size}
    if cell.split == "iid":
        return PartitionSpec(name="iid", sites=sites, **common)
    if cell.split.startswith("dirichlet-"):
        return PartitionSpec(name="dirichlet", sites=sites, alpha=float(cell.split.split("-")[1]), **common)
    if cell.split == "natural":
        return PartitionSpec(name="natural", sites=None, natural_by="site", **common)
    raise ConfigError("split", cell.split, "one of " + ", ".join(SPLITS))


def cell_run_config(cell: Cell, settings: StudySettings, num_sites: int) -> dict[str, Any]:
    """The run settings of a cell: the study's [run] table plus what the cell changes."""
    config: dict[str, Any] = {
        **settings.run,
        "seed": cell.seed,
        "kd-seed": cell.seed,
        "strategy": cell.strategy,
        "kd-enabled": cell.kd,
        "kd-no-kd-baseline": cell.kd,
        "cache-dir": str(settings.out / "cache"),
        "min-train-sites": num_sites,
        "min-evaluate-sites": num_sites,
        "min-available-sites": num_sites,
        "teacher-norm": cell.norm,
    }
    if cell.strategy == "fedprox":
        config["proximal-mu"] = settings.proximal_mu
    # the product delivers a federated student by default; only the cells that study it pay for it
    config["kd-federated-student-rounds"] = settings.federated_student_rounds if cell.federated_student else 0
    if cell.holdout:  # the external table scores the teacher and the delivered students only
        config["kd-no-kd-baseline"] = False
    if cell.dataset == "nih":
        config["task"] = settings.datasets["nih"].task
    if cell.dp_epsilon is not None:
        config.update(settings.dp_run)
        config.update(
            {"dp-enabled": True, "dp-target-epsilon": cell.dp_epsilon, "dp-target-delta": settings.dp_delta}
        )
    config.update(dict(cell.overrides))
    if settings.cpus_per_site > 1:  # a site that has the cores to itself trains with all of them
        config["num-threads"] = settings.cpus_per_site
    return config


StageCallback = Callable[[str], None]

# Run settings that say how a cell ran, not what it computed: a re-run may change them freely.
OPERATIONAL_KEYS = frozenset(
    {"num-threads", "cache-dir", "min-train-sites", "min-evaluate-sites", "min-available-sites"}
)


def _operational(key: str) -> bool:
    # timeouts, and the public teacher's file (its path follows --out; the study writes it once)
    return key in OPERATIONAL_KEYS or key.endswith("-timeout") or key == "teacher-weights"


def _read_cell_record(folder: Path, path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"{path}: not a readable result ({exc}); delete the folder {folder} to run the cell again"
        ) from exc
    if not isinstance(record, dict):
        raise DataError(
            f"{path}: not a readable result (not a JSON object); delete the folder {folder} to run "
            "the cell again"
        )
    return record


def _stored_run_config(folder: Path) -> dict[str, Any] | None:
    result = _read_cell_record(folder, folder / "result.json")
    if isinstance(result.get("run_config"), dict):
        return dict(result["run_config"])
    recorded = folder / "experiment" / "run" / "run_config.json"  # cells finished before 2026-11-30
    if recorded.is_file():
        return _read_cell_record(folder, recorded)
    return None


def stale_settings(cell: Cell, settings: StudySettings) -> dict[str, tuple[Any, Any]]:
    """The run settings a finished cell ran with that the study's settings now change:
    ``{key: (ran with, now)}``; empty when none differ or the cell kept no record of them."""
    folder = settings.out / "cells" / cell.name
    stored = _stored_run_config(folder)
    if stored is None:
        return {}
    expected = cell_run_config(cell, settings, int(stored.get("min-train-sites", settings.sites)))
    missing = "(not set)"
    return {
        key: (stored.get(key, missing), value)
        for key, value in expected.items()
        if not _operational(key) and stored.get(key, missing) != value
    }


def check_finished_cells(cells: list[Cell], settings: StudySettings) -> None:
    """Refuse, before any cell runs, to reuse a finished cell whose settings the study now changes
    (its results would be reported under settings it never ran with)."""
    problems = []
    for cell in cells:
        if not (settings.out / "cells" / cell.name / "result.json").is_file():
            continue
        changed = stale_settings(cell, settings)
        if changed:
            listed = ", ".join(
                f"{key} = {was!r} (now {now!r})" for key, (was, now) in sorted(changed.items())
            )
            problems.append(f"  {settings.out / 'cells' / cell.name}: ran with {listed}")
    if problems:
        raise DataError(
            f"finished cells of the study in {settings.out} ran with other settings than "
            f"{settings.config_file} now gives:\n" + "\n".join(problems) + "\nMove or delete those "
            "folders to run the cells again with the new settings, or restore the old settings."
        )


def run_cell(
    cell: Cell,
    settings: StudySettings,
    *,
    on_stage: StageCallback | None = None,
    on_round: Callable[[int, int, int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Run one cell (or read its finished result) and return its result record."""

    stage = on_stage or (lambda _text: None)
    folder = settings.out / "cells" / cell.name
    result_path = folder / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    if folder.exists():  # an interrupted attempt: start the cell again from scratch
        shutil.rmtree(folder)
    stage("preparing the held-out test set and the pool")
    data = prepare(settings, cell.dataset)
    public = public_weights(settings.out, str(settings.run.get("teacher-name", "")))
    if dict(cell.overrides).get("teacher-weights") == str(public):
        stage("pretraining the coordinator's teacher on public images (once)")
        ensure_public_teacher(settings, data.pool, data.test)
        score_public_teacher(settings, data)
    external = None
    if cell.holdout:
        holdout = next((h for h in settings.external.holdouts if h.name == cell.holdout), None)
        if holdout is None:
            raise ConfigError("holdout of cell " + cell.name, cell.holdout, "a name of [[external.holdouts]]")
        classes = get_task(settings.datasets[cell.dataset].task).classes
        external = split_external(holdout, data.pool, data.test, folder / "data", classes)
        data = replace(data, pool=external.pool)
    num_sites = (
        distinct_sites(data.pool)
        if cell.split == "natural"
        else (settings.nih_sites if cell.dataset == "nih" else settings.sites)
    )
    run_config = cell_run_config(cell, settings, num_sites)
    config = ExperimentConfig(
        out=folder / "experiment",
        sources=(SourceSpec("manifest", str(data.pool)),),
        task=settings.datasets[cell.dataset].task,
        partition=_partition_spec(cell, settings),
        run_config=run_config,
        require_all_classes=cell.dataset != "nih",  # 1,000 NIH images: some findings are very rare
        gpus_per_site=settings.gpus_per_site,
        cpus_per_site=settings.cpus_per_site,
        ray_address=settings.ray_address,
    )
    started = time.perf_counter()
    experiment = Experiment(config)
    experiment.run(on_round=on_round, on_stage=stage)
    federated_seconds = time.perf_counter() - started
    stage(
        "scoring on the held-out test set" + (" and training baselines" if cell.pooled or cell.local else "")
    )
    if external is not None:
        result = score_external_cell(cell, experiment.out, external, settings.external)
    else:
        result = score_cell(cell, experiment.out, data)
    result["seconds"] = {"federated": federated_seconds, "total": time.perf_counter() - started}
    result["run_config"] = run_config  # what check_finished_cells compares on a re-run
    write_json(result_path, result)
    return result


def _held_out(test_manifest: Path, settings: Any) -> Any:
    return load_eval_dataset(
        site_data_request(
            settings.run, settings.task, "manifest", test_manifest, Path(settings.run.cache_dir), whole=True
        )
    )


def _scores(model_config: Any, state: Mapping[str, Any], dataset: Any, task: Any) -> dict[str, float]:
    model = build_loaded_model(model_config, task, state)
    result = evaluate(model, DataLoader(dataset, batch_size=EVAL_BATCH_SIZE), task)
    return {"n": float(result.n), **scalar_metrics(result, "")}


def score_public_teacher(settings: StudySettings, data: PreparedData) -> dict[str, float]:
    """The coordinator's public teacher alone, before any federated round, on the held-out test set.

    The reference that says what the private rounds add to it (written once beside the weights).
    """
    weights = public_weights(settings.out, str(settings.run.get("teacher-name", "")))
    path = weights.parent / PUBLIC_SCORES_FILE
    if path.is_file():
        return dict(json.loads(path.read_text(encoding="utf-8")))
    task = settings.datasets["cxr"].task
    run_settings = run_settings_from_config(
        check_run_config(
            {**settings.run, "task": task, "teacher-norm": "group", "cache-dir": str(settings.out / "cache")}
        )
    )
    test = _held_out(data.test, run_settings)
    scores = _scores(run_settings.teacher, load_model_state(weights), test, run_settings.task)
    write_json(path, scores)
    return scores


def score_cell(cell: Cell, experiment_dir: Path, data: PreparedData) -> dict[str, Any]:
    """Score the cell's teacher (and students, baselines) on the held-out test set."""

    run_dir = experiment_dir / "run"
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    outcome = str(summary.get("federated_student", ""))
    if cell.federated_student and not outcome.startswith("delivered"):
        # the sites then deliver their own students: not what the cell measures
        raise DataError(
            f"cell {cell.name}: the federated student was not delivered ({outcome}); the cell is not "
            "kept: run the table again to redo it (often a site ran out of memory: run fewer jobs at once)"
        )
    settings = run_settings_from_config(json.loads((run_dir / "run_config.json").read_text(encoding="utf-8")))
    partition = json.loads((experiment_dir / "partition" / "partition.json").read_text(encoding="utf-8"))
    test = _held_out(data.test, settings)
    sites = load_sites(experiment_dir, settings, len(partition["sizes"]))
    teacher = settings.teacher
    record: dict[str, Any] = {
        "cell": {**asdict(cell), "overrides": dict(cell.overrides), "name": cell.name},  # JSON-native
        "partition": {
            "sizes": partition["sizes"],
            "label_counts": partition["label_counts"],
            "label_skew_tv": partition["label_skew_tv"],
            "natural_ids": partition.get("natural_ids"),
        },
        "site_train_images": {name: len(site.split.train) for name, site in sites.items()},
        "test_images": len(test),
        "best_round": summary["best_round"],
        "dp_epsilon_spent": summary.get("dp_epsilon_spent", {}),
        "teachers": {
            "federated": _scores(
                teacher, load_model_state(run_dir / "checkpoints" / "best.pt"), test, settings.task
            )
        },
    }
    if cell.kd:
        student = student_config(settings.distill, teacher, teacher.norm)
        record["students"] = {}
        for name in sites:
            folder = run_dir / "sites" / name
            record["students"][name] = {
                "kd": _scores(
                    student, load_model_state(folder / "student" / "student.pt"), test, settings.task
                )
            }
            if settings.kd_no_kd_baseline:  # an attempt may leave the baseline out
                nokd = load_model_state(folder / "nokd_student.pt")
                record["students"][name]["no_kd"] = _scores(student, nokd, test, settings.task)
    if cell.federated_student:
        student = student_config(settings.distill, teacher, teacher.norm)
        # the consortium's global student, as the server aggregated it
        global_student = load_model_state(run_dir / "checkpoints" / "student.pt")
        record["federated_student"] = _scores(student, global_student, test, settings.task)
        # what each site deploys by default (its delivered.json): the global student, or its
        # local fine-tune where that won on the site's validation split; at the argmax and at the
        # site's own operating point, beside the teacher at its operating point there
        record["delivered"] = {
            name: score_site(run_dir / "sites" / name, student, teacher, test, settings.task)
            for name in sites
        }
    seed = settings.train.seed
    if cell.pooled:
        started = time.perf_counter()
        state = train_baseline(PooledData(list(sites.values())), settings, seed=derive_seed(seed, "pooled"))
        record["teachers"]["pooled"] = _scores(teacher, state, test, settings.task)
        record["pooled_seconds"] = time.perf_counter() - started
    if cell.local:
        record["teachers"]["local"] = {}
        for name, site in sites.items():
            local_seed = derive_seed(seed, "local", name)
            state = train_baseline(site, settings, seed=local_seed)
            record["teachers"]["local"][name] = _scores(teacher, state, test, settings.task)
    return record


def machine_info() -> dict[str, Any]:
    import os

    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def run_table(
    table: str,
    settings: StudySettings,
    *,
    on_cell: Callable[[int, int, Cell], None] | None = None,
    on_stage: StageCallback | None = None,
    on_round: Callable[[int, int, int, int, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every cell of a table; records the table's wall time and machine."""
    cells = table_cells(table, settings)
    check_finished_cells(cells, settings)
    started = time.perf_counter()
    results = []
    for i, cell in enumerate(cells):
        if on_cell is not None:
            on_cell(i, len(cells), cell)
        results.append(run_cell(cell, settings, on_stage=on_stage, on_round=on_round))
    timing_path = settings.out / "tables" / f"{table}.json"
    previous = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else {}
    seconds = time.perf_counter() - started
    write_json(
        timing_path,
        {
            "table": table,
            "cells": [c.name for c in cells],
            # a resumed table adds the time of this invocation to the earlier ones
            "seconds": float(previous.get("seconds", 0.0)) + seconds,
            "machine": machine_info(),
            "settings_file": str(settings.config_file),
        },
    )
    return results


def with_overrides(
    settings: StudySettings, out: Path | None, results: Path | None, seeds: list[int] | None
) -> StudySettings:
    """The settings with --out / --results / --seed from the command line, when given."""
    changes: dict[str, Any] = {}
    if out is not None:
        changes["out"] = Path(out).expanduser().resolve()
    if results is not None:
        changes["results"] = Path(results).expanduser().resolve()
    if seeds:
        changes["seeds"] = tuple(seeds)
    return replace(settings, **changes)


def with_resources(
    settings: StudySettings, gpus_per_site: float, ray_address: str, cpus_per_site: int = 1
) -> StudySettings:
    """The settings with the cells' Ray resources (``--gpus-per-site``, ``--cpus-per-site``,
    ``--ray-address``), checked."""
    from simulation.runtime import check_gpus_per_site, check_ray_address, federation_config

    federation_config(1, cpus_per_site)  # ConfigError naming cpus-per-site unless an integer >= 1
    return replace(
        settings,
        gpus_per_site=check_gpus_per_site(gpus_per_site),
        cpus_per_site=cpus_per_site,
        ray_address=check_ray_address(ray_address),
    )
