"""The ``python -m simulation`` command line (typer): one app, one subcommand per job.

Subcommands are thin: they check and pair their options, hand off to library code
(:mod:`common.data.sources` for reading, :mod:`simulation.partition` for splitting and writing)
and print a short summary with rich. A user error (:class:`~common.errors.CxrFlError`) is printed
as one line on stderr, without a traceback, and exits with code 2.
Each command imports the library code it hands off to when it runs (not at the top), so that
``--help`` and option errors answer at once, without loading numpy, torch or Flower.

Without a subcommand the app calls :data:`default_action`: the default synthetic federation
(``_demo``: 3 sites, ResNet18 teacher, distillation, baselines, report).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.logging import RichHandler
from rich.table import Table

from common.cli_support import stderr, stdout, typer_app, user_errors

P = ParamSpec("P")
R = TypeVar("R")

app = typer_app(
    "simulation",
    "Simulated federations of chest X-ray sites: non-IID partitions of public data sets.",
    no_args_is_help=False,
)


def _print_help(ctx: typer.Context) -> None:
    typer.echo(ctx.get_help())


default_action: Callable[[typer.Context], None] = _print_help
"""Called by ``python -m simulation`` with no subcommand (replaceable; see the module docstring)."""


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress (INFO level).")] = False,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the default federation's partition and training.")
    ] = 0,
) -> None:
    _setup_logging(logging.INFO if verbose else logging.WARNING)
    if ctx.invoked_subcommand is None:
        default_action(ctx)


def _print_line(text: str) -> None:
    stdout.print(text, markup=False, highlight=False)


def _setup_logging(level: int) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(console=stderr, show_path=False, show_time=False))
    root.setLevel(level)


# The options of `partition`
PartitionOut = Annotated[Path, typer.Option("--out", "-o", help="Folder for the manifests, table and plot.")]
PartitionSources = Annotated[
    list[str] | None,
    typer.Option(
        help="Data source format (repeatable; pairs in order with --data).",
        show_default="synthetic",
    ),
]
PartitionData = Annotated[
    list[Path] | None, typer.Option(help="Data folder or file of each --source (omit for synthetic).")
]
PartitionTask = Annotated[str, typer.Option(help="Task whose classes the labels are mapped onto.")]
PartitionerName = Annotated[
    str,
    typer.Option(
        "--partition", help="iid, dirichlet, pathological, quantity-skew or natural (by site/source)."
    ),
]
PartitionSites = Annotated[
    int | None, typer.Option(help="Number of sites (default 3; natural: one per site/source value).")
]
PartitionAlpha = Annotated[
    float | None,
    typer.Option(help="Dirichlet alpha for dirichlet (labels) and quantity-skew (sizes); default 0.5."),
]
PartitionClassesPerSite = Annotated[
    int | None, typer.Option(help="Classes per site for pathological (default 2).")
]
MinSiteSize = Annotated[
    int, typer.Option(help="Smallest allowed site, in patients (images when ids are unknown).")
]
PartitionNaturalBy = Annotated[str, typer.Option(help="Field of the natural split: site or source.")]
PatientSplit = Annotated[
    bool, typer.Option(help="Keep all images of a patient in one site (when patient ids exist).")
]
PartitionSeed = Annotated[int, typer.Option(help="Seed of every random choice (recorded in partition.json).")]
PartitionSourceOptions = Annotated[
    list[str] | None,
    typer.Option(help="Source option KEY=VALUE for every source, or FORMAT.KEY=VALUE (repeatable)."),
]
Strict = Annotated[bool, typer.Option(help="Treat missing listed images as errors.")]
Overwrite = Annotated[bool, typer.Option(help="Replace the contents of a non-empty --out.")]
PartitionDropDuplicates = Annotated[
    bool, typer.Option(help="Leave out exact duplicate images (e.g. the same image in two sources).")
]


@app.command()
@user_errors
def partition(
    out: PartitionOut,
    source: PartitionSources = None,
    data: PartitionData = None,
    task: PartitionTask = "normal-pneumonia-covid",
    partitioner: PartitionerName = "dirichlet",
    sites: PartitionSites = None,
    alpha: PartitionAlpha = None,
    classes_per_site: PartitionClassesPerSite = None,
    min_site_size: MinSiteSize = 10,
    natural_by: PartitionNaturalBy = "site",
    patient_split: PatientSplit = True,
    seed: PartitionSeed = 0,
    source_option: PartitionSourceOptions = None,
    strict: Strict = False,
    overwrite: Overwrite = False,
    drop_duplicates: PartitionDropDuplicates = False,
) -> None:
    """Split data sets into non-IID sites: one manifest CSV per site, partition.json, table and plot."""
    from common.data.source_pairs import drop_duplicate_images, load_sources
    from simulation.partition import label_skew, label_table_rows, partition_catalog, write_partition

    formats = list(source or ["synthetic"])
    catalog, source_paths, source_options = load_sources(
        formats, list(data or []), task, option_pairs=list(source_option or []), strict=strict
    )
    if drop_duplicates:
        catalog = drop_duplicate_images(catalog, None, _print_line)
    if sites is None and partitioner != "natural":
        sites = 3
    result = partition_catalog(
        catalog,
        partitioner,
        sites,
        seed=seed,
        alpha=alpha,
        classes_per_site=classes_per_site,
        min_site_size=min_site_size,
        by_patient=patient_split,
        natural_by=natural_by,  # type: ignore[arg-type]  # checked in partition_catalog
    )
    written = write_partition(
        out, catalog, result, source_paths=source_paths, source_options=source_options, overwrite=overwrite
    )

    header, rows = label_table_rows(result, catalog)
    _print_table(f"{partitioner} partition of {len(catalog)} images, seed {seed}", header, rows, written)
    skew = label_skew(result, catalog)
    stdout.print(f"label skew (mean total variation from the global mix): {skew:.3f}")
    stdout.print(f"wrote {result.num_sites} site manifests, partition.json and label_distribution.md/.png")
    stdout.print(str(written), markup=False, highlight=False, soft_wrap=True)


def _print_table(title: str, header: list[str], rows: list[list[str]], folder: Path) -> None:
    """Print sites x labels, or labels x sites if that fits the terminal better, or a pointer."""

    def width(table_rows: list[list[str]]) -> int:
        return sum(max(len(r[c]) for r in table_rows) + 3 for c in range(len(table_rows[0]))) + 1

    cells = [header, *rows]
    transposed = [list(col) for col in zip(*cells, strict=True)]
    transposed[0][0] = "label"
    for candidate in (cells, transposed):
        if width(candidate) <= stdout.width:
            table = Table(title=title)
            for i, name in enumerate(candidate[0]):
                table.add_column(name, justify="left" if i == 0 else "right")
            for row in candidate[1:]:
                table.add_row(*row)
            stdout.print(table)
            return
    note = f"{title}: too wide for this terminal, see {folder / 'label_distribution.md'}"
    stdout.print(note, soft_wrap=True)


DEMO_RUN_CONFIG: dict[str, object] = {
    "teacher-name": "resnet18",
    "image-size": 64,
    "num-rounds": 6,
    "local-epochs": 1,
    "batch-size": 32,
    "optimizer": "adam",
    "lr": 0.001,
    "test-fraction": 0.55,
    "kd-epochs": 2,
    "kd-batch-size": 16,
    "kd-optimizer": "adam",
    "kd-lr": 0.002,
    "kd-alpha": 0.9,
    "kd-temperature": 2.0,
    "kd-warmup-epochs": 0,
    "kd-select-metric": "fidelity",
    "kd-recalibrate-bn": False,
    "kd-public-epochs": 12,
    "kd-public-batch-size": 32,
    "kd-public-lr": 0.004,
    "kd-width-mult": 0.5,
    "kd-federated-student-rounds": 0,
    "min-train-sites": 3,
    "min-evaluate-sites": 3,
    "min-available-sites": 3,
}
"""The demo's run settings (issue 25), chosen for a run of under 5 minutes on 2 cores: six
one-epoch rounds from the coordinator's publicly pretrained start (FedAvg under label skew gains
more from frequent averaging than from longer local training; 5 rounds fell below the pooled
teacher's 0.97x on seed 1), a test split of 55% so that every site tests on at least 200 images,
and each site delivers the student it distilled itself, in batches of 16 (a site's few hundred
images give MobileNetV2 only a few dozen optimiser steps per epoch). The students start from the
coordinator's distillation on public images: a MobileNetV2 of width 0.5 (2.35x the training
throughput of width 1.0 on 2 cores) for 12 epochs in batches of 32 at twice the sites' rate (the
linear scaling rule; with the channels-last layout 2x the images per second of batches of 16,
benchmarks/results/demo.md): its top class agrees with the teacher's on 86-94% of held-out public
images (width 1.0 x 6 epochs: 88-90%, and the students missed the check on seeds 3 and 5).
Each site's 2 fine-tuning epochs compete with that start on its validation split by fidelity to
the teacher, which keeps its pooled BatchNorm statistics (by macro-AUROC towards a teacher
re-calibrated on the site's images, a fine-tuned epoch won at 2 of 18 sites over seeds 0-5 and
lost on the test split both times, once by 0.107 balanced accuracy). The federated student is
off here: six rounds of it added half a minute and delivered macro-AUROC 0.47-0.58."""


DEMO_SOURCES: tuple[Any, ...] | None = None
"""Sources of the default run (None: 2400 built-in synthetic images at 64 px, see below)."""

DEMO_SYNTHETIC_OPTIONS: dict[str, str] = {"n-images": "2400", "image-size": "64", "difficulty": "0.7"}
"""The demo's synthetic images: hard enough (faint lesions, look-alike shadows, noise) that the
teachers and students do not all score 1.000 and the comparisons in the report mean something."""

DEMO_PUBLIC_OPTIONS: dict[str, str] = {**DEMO_SYNTHETIC_OPTIONS, "seed": "1"}
"""The coordinator's "public" images of the demo, from which it distils the students' start: the
same generator with another seed (none of the sites' images), standing in for a public CXR set."""

DEMO_PUBLIC_SOURCES: tuple[Any, ...] | None = None
"""Sources of the coordinator's public images (None: :data:`DEMO_PUBLIC_OPTIONS`)."""

DEMO_PRETRAIN_IMAGES = 1200
DEMO_PRETRAIN_EPOCHS = 3
"""The coordinator pretrains the teacher's start on the first 1,200 public images (their labels
used; half as many images as the sites hold together) for 3 epochs, as ``cxr-fl-server pretrain``
does in a deployment; the federated, pooled and local-only teachers all start from it. From random
weights the federated teacher reached only 0.86x the pooled teacher's macro-AUROC (seeds 0-2),
from this start 0.99-1.02x, and the federation still adds to the start alone (report's table;
benchmarks/results/demo.md). A set as large as the sites' (2,400 images) would leave the
federation little to add."""

DEMO_MIN_SITE_SIZE = 185
"""Patients (two images each) every demo site gets at least: with the 55% test split, at least 200
test images per site, so that a difference of 0.02 is more than one image (seeds 0-9 partition at
the first or a later Dirichlet draw)."""


def _default_out() -> Path:
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")


def _round_display(
    progress: Any, metric_label: str
) -> tuple[Any, Callable[[int, int, int, int, float], None]]:
    """A hidden "teacher rounds" bar and the callback that shows and advances it."""
    rounds = progress.add_task("teacher rounds", total=None, visible=False)

    def on_round(done: int, total: int, replied: int, sampled: int, metric: float) -> None:
        progress.update(
            rounds,
            total=total,
            completed=done,
            visible=True,
            description=f"teacher rounds ({replied}/{sampled} sites, {metric_label} {metric:.3f})",
        )

    return rounds, on_round


def progress_text(progress: Any) -> str | None:
    """One plain line for a teacher round, its validation or a federated-student round (None for
    other progress)."""
    took = "" if progress.seconds is None else f", {progress.seconds:.1f} s"
    if progress.phase == "student":
        return (
            f"student round {progress.completed_round}/{progress.num_rounds}: {progress.replied} sites{took}"
        )
    if progress.phase == "validation":
        return (
            f"round {progress.completed_round}/{progress.num_rounds} validation: {progress.replied} sites, "
            f"val {progress.metric_name} {progress.metric:.3f}"
        )
    if progress.phase != "teacher" or progress.replied is None:
        return None
    metric = "" if progress.metric is None else f", val {progress.metric_name} {progress.metric:.3f}"
    return (
        f"round {progress.completed_round}/{progress.num_rounds}: "
        f"{progress.replied}/{progress.sampled} sites{metric}{took}"
    )


def _run_with_lines(experiment: Any) -> Path:
    """Run with one plain line per stage and per round (output that is not a terminal: a pipe, a
    log file, CI), printed as it happens; a live progress display would show only at the end."""

    def line(text: str) -> None:
        stdout.print(text, markup=False, highlight=False, soft_wrap=True)

    def on_progress(progress: Any) -> None:
        text = progress_text(progress)
        if text is not None:
            line(text)

    return experiment.run(on_stage=line, on_progress=on_progress).report  # type: ignore[no-any-return]


def run_experiment_with_progress(config: Any) -> Path:
    """Run an experiment with a rich progress display in a terminal, plain lines otherwise;
    returns the report path."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from simulation.experiment import Experiment

    experiment = Experiment(config)
    if not stdout.is_terminal:
        return _run_with_lines(experiment)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stdout) as progress:
        stage = progress.add_task("starting", total=None)
        _, on_round = _round_display(progress, "val metric")

        def on_stage(text: str) -> None:
            progress.update(stage, description=text)

        result = experiment.run(on_round=on_round, on_stage=on_stage)
        progress.update(stage, description="done", total=1, completed=1)
    return result.report


GPUS_PER_SITE_OPTION = typer.Option(
    help="Ray's GPU share per simulated site (Flower's client-resources-num-gpus), e.g. 0.25 for "
    "four sites per GPU; 0 (default): Ray does not place sites on GPUs."
)
RAY_ADDRESS_OPTION = typer.Option(
    help="Run the simulated sites on this existing Ray cluster (HOST:PORT of its head, ray://HOST:PORT "
    "or auto) instead of a local Ray; its nodes need this project and environment at the same paths."
)

# The options of `run` (None: the config file's value, else the default)
RunOut = Annotated[Path | None, typer.Option("--out", "-o", help="Experiment folder (default runs/<time>).")]
RunConfigFile = Annotated[
    Path | None, typer.Option(help="TOML file with the same settings (options given here win).")
]
RunSources = Annotated[list[str] | None, typer.Option(help="Data source format (repeatable).")]
RunData = Annotated[list[Path] | None, typer.Option(help="Data path of each --source.")]
RunSourceOptions = Annotated[list[str] | None, typer.Option(help="KEY=VALUE or FORMAT.KEY=VALUE.")]
RunPublicSources = Annotated[
    list[str] | None,
    typer.Option(
        help="The coordinator's public data: source format (repeatable); the students' start is "
        "distilled on them, and the teacher pretrained with --pretrain-images."
    ),
]
RunPublicData = Annotated[list[Path] | None, typer.Option(help="Data path of each --public-source.")]
RunPublicOptions = Annotated[
    list[str] | None, typer.Option(help="KEY=VALUE or FORMAT.KEY=VALUE of the public sources.")
]
RunPretrainImages = Annotated[
    int | None,
    typer.Option(help="Pretrain every teacher's start on the first N public images (labels used); 0: off."),
]
RunPretrainEpochs = Annotated[int | None, typer.Option(help="Epochs of that pretraining (default 3).")]
RunTask = Annotated[str | None, typer.Option(help="Task (default normal-pneumonia-covid).")]
RunPartitioner = Annotated[str | None, typer.Option("--partition", help="Partitioner name.")]
RunAlpha = Annotated[float | None, typer.Option(help="Dirichlet alpha.")]
RunSites = Annotated[int | None, typer.Option(help="Number of sites.")]
RunClassesPerSite = Annotated[int | None, typer.Option(help="Classes per site (pathological).")]
RunNaturalBy = Annotated[str | None, typer.Option(help="site or source (natural split).")]
RunSeed = Annotated[int | None, typer.Option(help="Seed of the partition and of training.")]
RunTeacher = Annotated[str | None, typer.Option(help="Teacher model name.")]
RunImageSize = Annotated[int | None, typer.Option(help="Image size in pixels.")]
RunRounds = Annotated[int | None, typer.Option(help="Teacher rounds.")]
RunLocalEpochs = Annotated[int | None, typer.Option(help="Local epochs per round.")]
RunStrategy = Annotated[str | None, typer.Option(help="fedavg, fedprox, fedadam, fedyogi, fedmedian, krum.")]
RunDpEpsilon = Annotated[
    float | None, typer.Option(help="DP-SGD at every site with this target epsilon (GroupNorm models).")
]
RunBaselines = Annotated[
    bool | None, typer.Option(help="Also train pooled and local-only teachers and a no-KD student.")
]
RunDropDuplicates = Annotated[
    bool | None, typer.Option(help="Leave out exact duplicate images before partitioning.")
]
RunSetItems = Annotated[
    list[str] | None, typer.Option("--set", help="Any run setting KEY=VALUE (see pyproject.toml).")
]
RunDevice = Annotated[
    str | None, typer.Option(help="Device of the simulated sites: auto (default), cpu, cuda or cuda:N.")
]
RunGpusPerSite = Annotated[float | None, GPUS_PER_SITE_OPTION]
RunRayAddress = Annotated[str | None, RAY_ADDRESS_OPTION]
RunTrack = Annotated[
    str | None,
    typer.Option(help="Local experiment tracker: tensorboard (event files in OUT/run/tensorboard)."),
]


@app.command()
@user_errors
def run(
    out: RunOut = None,
    config: RunConfigFile = None,
    source: RunSources = None,
    data: RunData = None,
    source_option: RunSourceOptions = None,
    public_source: RunPublicSources = None,
    public_data: RunPublicData = None,
    public_option: RunPublicOptions = None,
    pretrain_images: RunPretrainImages = None,
    pretrain_epochs: RunPretrainEpochs = None,
    task: RunTask = None,
    partitioner: RunPartitioner = None,
    alpha: RunAlpha = None,
    sites: RunSites = None,
    classes_per_site: RunClassesPerSite = None,
    natural_by: RunNaturalBy = None,
    seed: RunSeed = None,
    teacher: RunTeacher = None,
    image_size: RunImageSize = None,
    rounds: RunRounds = None,
    local_epochs: RunLocalEpochs = None,
    strategy: RunStrategy = None,
    dp_epsilon: RunDpEpsilon = None,
    baselines: RunBaselines = None,
    drop_duplicates: RunDropDuplicates = None,
    set_: RunSetItems = None,
    device: RunDevice = None,
    gpus_per_site: RunGpusPerSite = None,
    ray_address: RunRayAddress = None,
    track: RunTrack = None,
) -> None:
    """Run a whole simulated federation: partition, teacher rounds, distillation, baselines, report."""
    from simulation.experiment import SourceArgs, experiment_config

    public = SourceArgs(
        list(public_source or []), list(public_data or []), list(public_option or []), "public-source"
    )
    resolved = experiment_config(
        config_file=config,
        out=out,
        sources=list(source or []),
        data=list(data or []),
        source_options=list(source_option or []),
        task=task,
        partition={
            "name": partitioner,
            "alpha": alpha,
            "sites": sites,
            "classes_per_site": classes_per_site,
            "natural_by": natural_by,
            "seed": seed,
        },
        run_settings={
            "teacher-name": teacher,
            "image-size": image_size,
            "num-rounds": rounds,
            "local-epochs": local_epochs,
            "strategy": strategy,
            "seed": seed,
            "device": device,
            "track": track,
        },
        dp_epsilon=dp_epsilon,
        baselines=baselines,
        drop_duplicates=drop_duplicates,
        set_items=list(set_ or []),
        default_out=_default_out(),
        gpus_per_site=gpus_per_site,
        ray_address=ray_address,
        public=public,
        pretrain_images=pretrain_images,
        pretrain_epochs=pretrain_epochs,
    )
    report = run_experiment_with_progress(resolved)
    stdout.print(f"report: {report}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@user_errors
def report(
    experiment_dir: Annotated[Path, typer.Argument(help="An experiment folder written by `run`.")],
) -> None:
    """Rebuild report.md, results.json and the plots from an experiment folder."""
    from simulation.report import build_report

    path = build_report(experiment_dir)
    stdout.print(f"report: {path}", markup=False, highlight=False, soft_wrap=True)


@user_errors
def _demo(ctx: typer.Context) -> None:
    """The default federation: synthetic images, 3 sites, a small teacher, a few rounds, report."""
    from simulation.experiment import ExperimentConfig, PartitionSpec

    stdout.print(
        "Running the default simulated federation on built-in synthetic chest X-ray-like images "
        "(a smoke-test data set, not medical data). `python -m simulation --help` lists the commands."
    )
    from simulation.experiment import SourceSpec
    from simulation.public_teacher import PublicPretraining

    sources = DEMO_SOURCES or (SourceSpec("synthetic", None, DEMO_SYNTHETIC_OPTIONS),)
    seed = int(ctx.params.get("seed") or 0)
    config = ExperimentConfig(
        out=_default_out(),
        sources=sources,
        partition=PartitionSpec(
            name="dirichlet", sites=3, alpha=1.0, min_site_size=DEMO_MIN_SITE_SIZE, seed=seed
        ),
        run_config={**DEMO_RUN_CONFIG, "seed": seed},
        baselines=True,
        local_baselines=False,  # 40 s of the 5 minutes; the start alone shows what the federation adds
        public_sources=DEMO_PUBLIC_SOURCES or (SourceSpec("synthetic", None, DEMO_PUBLIC_OPTIONS),),
        pretrain=PublicPretraining(DEMO_PRETRAIN_IMAGES, DEMO_PRETRAIN_EPOCHS),
    )
    report_path = run_experiment_with_progress(config)
    stdout.print(f"report: {report_path.resolve()}", markup=False, highlight=False, soft_wrap=True)


default_action = _demo


def main() -> None:
    """Entry point of ``python -m simulation``."""
    from common.processes import exit_on_sigterm

    exit_on_sigterm()  # a SIGTERM stops the Flower and Ray processes of the run, as Ctrl-C does
    app(prog_name="python -m simulation")
