"""One simulated federation, start to finish: partition, federated run, baselines, report.

The experiment folder::

    OUT/
      experiment.json     the full resolved settings (sources, partition, run config, seeds)
      partition/          per-site manifests, partition.json, label distribution (table + PNG)
      run/                the coordinator's run folder (metrics.jsonl, checkpoints, summary,
                          sites/site_XX/ with each site's student, model card, compression table)
      public/             the coordinator's public images (site_00.csv; the demo's), and with
                          ``pretrain`` the teacher's pretrained start (teacher.pt + its sidecar)
      baselines.json      pooled and local-only teachers (when --baselines; the start alone when
                          pretrained), and
      baselines_scores.npz  the federated and pooled teachers' per-image pooled test scores
      site_scores.npz     per-image test scores of each site's teacher and students (when
                          --baselines: the report's paired intervals, simulation/site_scores.py)
      report/             report.md, results.json and the plots
      flower/             Flower's logs and its private FLWR_HOME

Every setting is checked before anything is trained (unknown run setting, source or
partitioner, impossible partitions, bad DP settings), and the Flower/Ray processes started for
the run are stopped by PID on exit, error or Ctrl-C (see simulation/runtime.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import run_settings as settings_module
from common.config import TaskConfig
from common.data.source_pairs import drop_duplicate_images, load_sources, parse_source_options
from common.device import resolve_device
from common.errors import ConfigError, CxrFlError
from common.run_settings import (
    FederatedRunConfig,
    check_run_config,
    coerce_setting,
    load_schema,
    read_toml,
    resolve_run_config,
    run_settings_from_config,
)
from server.progress_events import EventFollower, Progress
from server.run_folder import RunFolder
from simulation.baselines import run_baselines
from simulation.experiment_folder import experiment_run
from simulation.partition import partition_catalog, write_partition
from simulation.pooled_background import PooledTeacherJob
from simulation.public_teacher import PublicPretraining, pretrain_public_teacher
from simulation.report import build_report
from simulation.runtime import FlowerSimulation, check_gpus_per_site, check_ray_address
from simulation.site_scores import score_site_models

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSpec:
    """One data source of the experiment: format, path (None for synthetic), options."""

    fmt: str
    path: str | None = None
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartitionSpec:
    name: str = "dirichlet"
    sites: int | None = 3
    alpha: float | None = None
    classes_per_site: int | None = None
    natural_by: str = "site"
    min_site_size: int = 5
    seed: int = 0


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything ``python -m simulation run`` resolves before it starts."""

    out: Path
    sources: tuple[SourceSpec, ...] = (
        SourceSpec("synthetic", None, {"n-images": "360", "image-size": "64"}),
    )
    task: str = TaskConfig().name  # the run setting's default (pyproject's task)
    partition: PartitionSpec = PartitionSpec()
    run_config: dict[str, Any] = field(default_factory=dict)
    baselines: bool = False
    local_baselines: bool = True
    """With ``baselines``, also a local-only teacher per site (the demo leaves them out for time)."""
    cpus_per_site: int = 1
    gpus_per_site: float = 0.0
    """Ray's GPU share per simulated site (Flower's client-resources-num-gpus)."""
    ray_address: str = ""
    """An existing Ray cluster to run the sites on ('' starts a local Ray)."""
    strict: bool = False
    drop_duplicates: bool = False
    require_all_classes: bool = True
    """Refuse a data set in which a class has no image (off for small multi-label checks)."""
    public_sources: tuple[SourceSpec, ...] = ()
    """The coordinator's public images for the students' start (run setting ``kd-public-manifest``,
    written to ``public/site_00.csv``); none: each site's student starts from random weights."""
    pretrain: PublicPretraining | None = None
    """The coordinator pretrains every teacher's start on the first public images (labelled) before
    round 1 (simulation/public_teacher.py); None: every teacher starts from random weights."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus_per_site", check_gpus_per_site(self.gpus_per_site))
        object.__setattr__(self, "ray_address", check_ray_address(self.ray_address))
        if self.pretrain is not None and not self.public_sources:
            raise ConfigError(
                "pretrain-images",
                self.pretrain.images,
                "0, or public images to pretrain on (--public-source, or [[public-sources]] in --config)",
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data


@dataclass
class ExperimentResult:
    out: Path
    report: Path
    settings: FederatedRunConfig


RoundCallback = Callable[[int, int, int, int, float], None]
ProgressCallback = Callable[[Progress], None]


class Experiment:
    """Runs one experiment folder; see the module docstring for its layout."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.out = Path(config.out).expanduser().resolve()
        self.run_dir = experiment_run(self.out).root
        self.partition_dir = self.out / "partition"
        self.public_dir = self.out / "public"

    def resolve_run_config(self) -> dict[str, Any]:
        overrides = dict(self.config.run_config)
        overrides["task"] = self.config.task
        overrides["run-dir"] = str(self.run_dir)
        overrides["simulation-manifest-dir"] = str(self.partition_dir)
        overrides.setdefault("cache-dir", str(self.out / "cache"))
        if self.config.public_sources:
            overrides["kd-public-manifest"] = str(self.public_dir / "site_00.csv")
        if self.config.baselines:
            overrides["kd-no-kd-baseline"] = True
        return check_run_config(overrides)

    def prepare(self, stage: Callable[[str], None] | None = None) -> tuple[dict[str, Any], int]:
        """Check settings, write the partition (and pretrain the teacher's start when asked);
        returns the run config and the number of sites."""

        run_config = self.resolve_run_config()
        check_local_device(run_settings_from_config(run_config), self.config)
        if RunFolder(self.run_dir).config_path.exists():
            raise ConfigError(
                "out",
                str(self.out),
                "a new folder: this one already holds an experiment (`python -m simulation report "
                "OUT` rebuilds its report)",
            )
        spec = self.config.partition
        catalog, source_paths, source_options = load_sources(
            [s.fmt for s in self.config.sources],
            [Path(s.path) if s.path else None for s in self.config.sources],
            self.config.task,
            option_pairs=[f"{s.fmt}.{k}={v}" for s in self.config.sources for k, v in s.options.items()],
            strict=self.config.strict,
        )
        if self.config.drop_duplicates:
            catalog = drop_duplicate_images(catalog, self.out / "cache")
        partition = partition_catalog(
            catalog,
            spec.name,
            spec.sites,
            seed=spec.seed,
            alpha=spec.alpha,
            classes_per_site=spec.classes_per_site,
            min_site_size=spec.min_site_size,
            natural_by=spec.natural_by,  # type: ignore[arg-type]
            require_all_classes=self.config.require_all_classes,
        )
        out_existed = self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        write_partition(
            self.partition_dir,
            catalog,
            partition,
            source_paths=source_paths,
            source_options=source_options,
            overwrite=True,
        )
        if self.config.public_sources:
            self.write_public_images()
        if self.config.pretrain is not None:
            announce = stage or (lambda _text: None)
            try:
                run_config = self.pretrain_teacher(run_config, self.config.pretrain, announce)
            except CxrFlError:  # e.g. a public image that is also a site's: nothing half-written stays
                self.remove_prepared(out_existed)
                raise
        (self.out / "experiment.json").write_text(
            json.dumps({**self.config.to_dict(), "resolved_run_config": run_config}, indent=2, default=str)
            + "\n",
            encoding="utf-8",
        )
        return run_config, partition.num_sites

    def remove_prepared(self, out_existed: bool) -> None:
        """Undo :meth:`prepare`'s writing: the whole OUT folder when it made it, else the partition
        and public folders (an earlier attempt's image cache stays: its files are complete)."""
        if not out_existed:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        for folder in (self.partition_dir, self.public_dir):
            shutil.rmtree(folder, ignore_errors=True)

    def write_public_images(self) -> None:
        """The coordinator's public images as one manifest (``public/site_00.csv``)."""
        sources = self.config.public_sources
        catalog, source_paths, source_options = load_sources(
            [s.fmt for s in sources],
            [Path(s.path) if s.path else None for s in sources],
            self.config.task,
            option_pairs=[f"{s.fmt}.{k}={v}" for s in sources for k, v in s.options.items()],
            strict=self.config.strict,
        )
        whole = partition_catalog(catalog, "iid", 1, seed=0, require_all_classes=False)
        write_partition(
            self.public_dir,
            catalog,
            whole,
            source_paths=source_paths,
            source_options=source_options,
            overwrite=True,
        )

    def pretrain_teacher(
        self, run_config: dict[str, Any], spec: PublicPretraining, stage: Callable[[str], None]
    ) -> dict[str, Any]:
        """Pretrain the teacher's start on the public images; the run config that starts from it."""
        stage(f"coordinator: pretraining the teacher on {spec.images} public images ({spec.epochs} epochs)")
        result = pretrain_public_teacher(
            self.public_dir,
            run_config,
            spec,
            site_manifests=sorted(self.partition_dir.glob("site_*.csv")),
            cache_dir=Path(run_config["cache-dir"]),
        )
        start = {"teacher-weights": str(result.weights), "initial-teacher-sha256": result.weights_sha256}
        return check_run_config({**run_config, **start})

    def run(
        self,
        on_round: RoundCallback | None = None,
        on_stage: Callable[[str], None] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> ExperimentResult:
        """Run the experiment; ``on_stage`` hears each stage, ``on_round`` each teacher round,
        ``on_progress`` every progress event of the federated run (teacher and student rounds),
        read from the run folder's events as Flower streams the run's log."""
        stage = on_stage or (lambda _text: None)
        stage("checking settings and partitioning the data")
        run_config, num_sites = self.prepare(stage)
        settings = run_settings_from_config(run_config)

        events = EventFollower(RunFolder(self.run_dir), progress_follower(stage, on_round, on_progress))
        pooled_state = None
        with contextlib.ExitStack() as background:
            pooled = None
            if self.config.baselines:  # then pooled_state holds the pooled teacher after the federation
                stage("baselines: the pooled teacher trains in the background on CPU the federation leaves")
                pooled = background.enter_context(PooledTeacherJob(self.out, run_config, num_sites))
            stage(f"federated run: {num_sites} sites in Flower's simulation runtime")
            with FlowerSimulation(self.out / "flower", ray_address=self.config.ray_address) as simulation:
                simulation.run(
                    run_config,
                    num_sites=num_sites,
                    cpus_per_site=self.config.cpus_per_site,
                    gpus_per_site=self.config.gpus_per_site,
                    on_line=lambda _line: events.poll(),
                )
            events.poll()
            if pooled is not None:
                if pooled.running():
                    stage("baselines: waiting for the pooled teacher")
                pooled_state = pooled.result()
        if pooled_state is not None:
            local = self.config.local_baselines
            extra = " and training local-only teachers" if local else ""
            stage(f"baselines: scoring the federated and pooled teachers{extra}")
            run_baselines(self.out, settings, num_sites, pooled_state, local=local)
            if settings.kd_enabled:
                stage("scoring each site's teacher and students for the report's intervals")
                score_site_models(self.out, settings, num_sites)
        stage("writing the report")
        report = build_report(self.out)
        if run_config.get("track"):
            from server.tracking import log_experiment_report

            log_experiment_report(self.run_dir, self.out)
        return ExperimentResult(self.out, report, settings)


def progress_follower(
    stage: Callable[[str], None], on_round: RoundCallback | None, on_progress: ProgressCallback | None
) -> ProgressCallback:
    """What the experiment does with each progress event of the federated run
    (server/progress_events.py): the distillation and the first federated-student round as
    stages, each teacher round to ``on_round``, then every event to ``on_progress``."""

    def follow(progress: Progress) -> None:
        if progress.phase == "start":
            stage(f"distilling the students' start at the coordinator on {progress.replied} public images")
        elif progress.phase == "distill":
            stage("distilling students at the sites")
        elif progress.phase == "student":
            if progress.completed_round == 1:
                stage("federated student rounds")
        elif on_round is not None and progress.replied is not None and progress.sampled is not None:
            on_round(
                progress.completed_round,
                progress.num_rounds,
                progress.replied,
                progress.sampled,
                progress.metric if progress.metric is not None else float("nan"),
            )
        if on_progress is not None:
            on_progress(progress)

    return follow


def check_local_device(settings: FederatedRunConfig, config: ExperimentConfig) -> None:
    """Refuse, before any work, a ``device`` or GPU share this machine cannot give.

    Simulated sites run here unless ``ray_address`` names another cluster; the baselines always
    run here. ``auto`` always passes (it falls back to the CPU).
    """
    runs_here = not config.ray_address or config.baselines
    if runs_here:
        resolve_device(settings.compute.device, option="run setting 'device'")
    if config.gpus_per_site > 0 and not config.ray_address and not torch_cuda_available():
        raise ConfigError(
            "gpus-per-site",
            config.gpus_per_site,
            "0 on this machine, which has no CUDA GPU (Ray would wait forever for one), or give "
            "--ray-address of a cluster with GPUs",
        )


def torch_cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


EXPERIMENT_KEYS: dict[str, Any] = {
    "out": str,
    "task": str,
    "baselines": bool,
    "cpus-per-site": int,
    "gpus-per-site": float,
    "ray-address": str,
    "strict": bool,
    "drop-duplicates": bool,
    "sources": list,
    "public-sources": list,
    "pretrain": dict,
    "partition": dict,
    "run": dict,
}
PARTITION_KEYS: dict[str, Any] = {
    "name": str,
    "sites": int,
    "alpha": float,
    "classes-per-site": int,
    "natural-by": str,
    "min-site-size": int,
    "seed": int,
}
SOURCE_KEYS: dict[str, Any] = {"format": str, "path": str, "options": dict}
PRETRAIN_KEYS: dict[str, Any] = {"images": int, "epochs": int}
_KIND_WORDS = {list: "an array of tables, e.g. [[sources]]", dict: "a table, e.g. [partition]"}


def _check_table(table: Mapping[str, Any], kinds: Mapping[str, Any], where: str, path: Path) -> None:
    """Every key of a config-file table known and of its type; ConfigError naming the key and file."""
    for key, value in table.items():
        name = f"key '{where}{key}' in {path}"
        if key not in kinds:
            raise ConfigError(name, value, "one of " + ", ".join(kinds))
        kind = kinds[key]
        if kind in _KIND_WORDS:
            if not isinstance(value, kind):
                raise ConfigError(name, value, _KIND_WORDS[kind])
        else:
            settings_module.coerce(name, value, kind)


def _read_config_file(path: Path) -> dict[str, Any]:
    data = read_toml(path)
    _check_table(data, EXPERIMENT_KEYS, "", path)
    _check_table(data.get("partition", {}), PARTITION_KEYS, "partition.", path)
    _check_table(data.get("pretrain", {}), PRETRAIN_KEYS, "pretrain.", path)
    for table in ("sources", "public-sources"):
        for i, source in enumerate(data.get(table, [])):
            where = f"{table}[{i}]."
            if not isinstance(source, dict):
                raise ConfigError(f"key '{table}' in {path}", source, _KIND_WORDS[list])
            _check_table(source, SOURCE_KEYS, where, path)
            if "format" not in source:
                raise ConfigError(
                    f"key '{where}format' in {path}", "missing", 'a source format, e.g. format = "manifest"'
                )
    if data.get("cpus-per-site", 1) < 1:
        raise ConfigError(f"key 'cpus-per-site' in {path}", data["cpus-per-site"], "an integer >= 1")
    return data


@dataclass(frozen=True)
class SourceArgs:
    """``--source``/``--data``/``--source-option`` (or their ``--public-*`` twins) as given."""

    formats: list[str] = field(default_factory=list)
    data: list[Path] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    flag: str = "source"


def _source_specs(
    given: SourceArgs, table: list[dict[str, Any]] | None, config_file: Path | None
) -> tuple[SourceSpec, ...] | None:
    """Sources from the command line, else from the config file's table; None if neither has any."""
    data_flag = given.flag.replace("source", "data")
    if given.data and (not given.formats or len(given.data) != len(given.formats)):
        raise ConfigError(
            data_flag,
            [str(d) for d in given.data],
            f"one --{data_flag} per --{given.flag} FORMAT ({len(given.formats)} given)",
        )
    if given.formats:
        options = parse_source_options(given.options, given.formats)
        paths = [str(Path(d).expanduser().resolve()) for d in given.data] or [None] * len(given.formats)
        return tuple(SourceSpec(fmt, paths[i], options[i]) for i, fmt in enumerate(given.formats))
    if table is None:
        return None
    base = config_file.parent if config_file is not None else Path.cwd()
    return tuple(
        SourceSpec(
            str(s["format"]),
            str((base / s["path"]).resolve()) if s.get("path") else None,
            {str(k): _option_text(v) for k, v in s.get("options", {}).items()},
        )
        for s in table
    )


def _pretraining(images: int | None, epochs: int | None, table: dict[str, Any]) -> PublicPretraining | None:
    """``--pretrain-images``/``--pretrain-epochs`` over the config file's ``[pretrain]`` (None: none)."""
    chosen = images if images is not None else table.get("images")
    if not chosen:
        return None
    return PublicPretraining(int(chosen), int(epochs if epochs is not None else table.get("epochs", 3)))


def experiment_config(
    *,
    config_file: Path | None,
    out: Path | None,
    sources: list[str],
    data: list[Path],
    source_options: list[str],
    task: str | None,
    partition: dict[str, Any],
    run_settings: dict[str, Any],
    dp_epsilon: float | None,
    baselines: bool | None,
    set_items: list[str],
    drop_duplicates: bool | None = None,
    default_out: Path,
    gpus_per_site: float | None = None,
    ray_address: str | None = None,
    public: SourceArgs | None = None,
    pretrain_images: int | None = None,
    pretrain_epochs: int | None = None,
) -> ExperimentConfig:
    """Merge a TOML config file and command-line options (the command line wins)."""
    file = _read_config_file(config_file) if config_file is not None else {}
    specs = _source_specs(SourceArgs(sources, data, source_options), file.get("sources"), config_file)
    if specs is None:
        specs = ExperimentConfig.__dataclass_fields__["sources"].default
    public_specs = _source_specs(
        public or SourceArgs(flag="public-source"), file.get("public-sources"), config_file
    )
    part = {k.replace("-", "_"): v for k, v in file.get("partition", {}).items()}
    part.update({k: v for k, v in partition.items() if v is not None})
    if part.get("name") == "natural" and "sites" not in part:
        part["sites"] = None  # one site per natural id
    schema = load_schema()
    run_config = {
        key: coerce_setting(key, value, schema, f"key in the [run] table of {config_file}")
        for key, value in file.get("run", {}).items()
    }
    run_config.update({k: v for k, v in run_settings.items() if v is not None})
    if dp_epsilon is not None:
        run_config.update(
            {"dp-enabled": True, "dp-target-epsilon": float(dp_epsilon), "teacher-norm": "group"}
        )
    run_config.update(resolve_run_config(schema, None, set_items))
    chosen_out = out or (Path(file["out"]) if "out" in file else default_out)
    return ExperimentConfig(
        out=Path(chosen_out).expanduser().resolve(),
        sources=specs,
        task=task or str(file.get("task", TaskConfig().name)),
        partition=PartitionSpec(**part),
        run_config=run_config,
        baselines=baselines if baselines is not None else file.get("baselines", False),
        cpus_per_site=file.get("cpus-per-site", 1),
        gpus_per_site=gpus_per_site if gpus_per_site is not None else float(file.get("gpus-per-site", 0.0)),
        ray_address=ray_address if ray_address is not None else str(file.get("ray-address", "")),
        strict=file.get("strict", False),
        drop_duplicates=drop_duplicates
        if drop_duplicates is not None
        else file.get("drop-duplicates", False),
        public_sources=public_specs or (),
        pretrain=_pretraining(pretrain_images, pretrain_epochs, file.get("pretrain", {})),
    )


def _option_text(value: object) -> str:
    """A source option from a TOML table as the command line spells it (``true``, not ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
