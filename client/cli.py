"""``cxr-fl-client``: the command a hospital runs next to its images.

This module holds the typer app and the ``check`` command (read a site's data through its
source adapter, decode every image into the cache, print what the site has). Other commands
(``init`` from an onboarding kit, ``start``, ``serve`` (``start`` that stays up across runs),
``predict``, ``explain``; ``audit`` and ``cache`` in client/site_cli.py) are added to the same
``app``. Commands stay thin: they check options, call library code in ``common/``, and turn a
:class:`~common.errors.CxrFlError` into a one-line message and exit code 2 (no traceback). Their
options are declared once, in client/cli_options.py; ``start`` builds the site's privacy
(client/site_privacy.py) and limits from its options and policy file in one step
(``_site_node_settings``).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from client.cli_options import (
    Accountant,
    ActivateTimeout,
    AllowApp,
    Bootstrap,
    BootstrapSeed,
    CaCert,
    CacheDir,
    CacheImageSize,
    CacheMaxAgeDays,
    CalibrationBins,
    CheckFormat,
    CheckImageSize,
    CheckTask,
    ClassThresholds,
    ConnectTimeout,
    DataFormat,
    DataPath,
    Delta,
    Device,
    Epsilon,
    EvaluatedModel,
    EvaluationOut,
    EvaluationTask,
    IgnoreOperatingPoint,
    InferenceThreads,
    InitialTeacher,
    InitialTeacherSha256,
    InitImageSize,
    Insecure,
    KitFolder,
    LabelledData,
    LabelledSourceOptions,
    LabelTask,
    MaxGradNorm,
    MaxImageSize,
    MaxKdEpochs,
    MaxLocalEpochs,
    MaxRounds,
    MaxTeacherParameters,
    OperatingPointCriterion,
    Phases,
    PolicyEpsilon,
    PolicyOption,
    PrivacyLedgerPath,
    ReconnectTimeout,
    ServerAddress,
    ShareDeliveredStudent,
    ShareExactMetrics,
    SharePerClassMetrics,
    SiteFolder,
    SiteKey,
    SiteName,
    SiteOut,
    SkipCheck,
    SourceOptions,
    StateDir,
    Strict,
    SupernodeMemory,
    Threshold,
    TrainThreads,
)
from client.ledger_cli import ledger_app
from client.site_cli import audit_app, cache_app
from common.cli_support import fail, stderr, stdout, typer_app
from common.errors import ConfigError, CxrFlError
from common.processes import exit_on_sigterm

if TYPE_CHECKING:
    from client.deploy import SiteNodeSettings
    from client.site_policy import SitePolicy
    from common.data.cache import CachedImages, SkippedImage
    from common.data.catalog import Catalog
    from common.evaluation import EvaluationResult, EvaluationSettings, ScoringModel
    from common.export import LoadedModel
    from common.operating_point import OperatingPoint
    from common.site_limits import PolicyFile
    from common.tasks import Task

app = typer_app(
    "cxr-fl-client",
    "Federated chest X-ray client: check a site's data, join a federation, predict, explain.",
)
console = stdout
err_console = stderr
app.add_typer(ledger_app, name="privacy-ledger")
app.add_typer(audit_app, name="audit")
app.add_typer(cache_app, name="cache")


def _criterion_option(text: str, task: str) -> str:
    """``--operating-point`` checked against the classes of ``--task`` (ConfigError otherwise)."""
    from common.operating_point import parse_criterion
    from common.tasks import get_task

    return str(parse_criterion(text, get_task(task), "--operating-point"))


def _policy_file(path: Path | None) -> PolicyFile | None:
    from common.site_limits import read_policy_file

    return None if path is None else read_policy_file(path)


def _policy_text(policy: SitePolicy) -> str:
    return ", ".join(
        f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in policy.node_config().items()
    )


LIMIT_OPTIONS = (
    "max_image_size",
    "max_local_epochs",
    "max_kd_epochs",
    "max_rounds",
    "max_teacher_parameters",
    "phases",
)
"""The site policy's limits among a command's options (``--max-*``, ``--phases``)."""


def _limits(*values: int | str | None) -> dict[str, int | str | None]:
    """A command's limit options by parameter name, from their values in ``LIMIT_OPTIONS``' order."""
    return dict(zip(LIMIT_OPTIONS, values, strict=True))


def _limits_of(options: dict[str, Any]) -> dict[str, int | str | None]:
    """The limit options among a command's options (its parameters by name)."""
    return {name: options[name] for name in LIMIT_OPTIONS}


def _site_policy(
    image_size: int, policy_file: PolicyFile | None = None, **limits: int | str | None
) -> SitePolicy:
    """The site policy of the CLI options (``max_image_size=...``), tightened by ``policy_file``,
    checked against the image size the command decodes: a run at a size beyond the policy would be
    declined."""
    from client.site_policy import SitePolicy

    values = {key.replace("_", "-"): value for key, value in limits.items()}
    policy = SitePolicy.from_mapping(values, lambda key: f"--{key}")
    if policy_file is not None:
        policy = policy.tightened_by(policy_file.limits)
    if image_size > policy.max_image_size:
        raise ConfigError(
            "--image-size",
            image_size,
            f"at most --max-image-size ({policy.max_image_size}): runs at a larger size are declined",
        )
    return policy


@app.callback()
def _root() -> None:
    """Federated chest X-ray client: check a site's data, join a federation, predict, explain."""


def _progress_bar() -> Progress:
    """The CLI's progress bar for long work (decoding, scoring): on stderr, gone when done."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def _parse_options(values: list[str] | None) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise fail(f"--option {item!r}: expected KEY=VALUE, e.g. --option drop-unmapped=true")
        options[key.strip()] = value.strip()
    return options


@app.command()
def check(
    fmt: CheckFormat,
    data: DataPath = None,
    task: LabelTask = "normal-pneumonia-covid",
    image_size: CacheImageSize = 64,
    strict: Strict = False,
    option: SourceOptions = None,
    cache_dir: CacheDir = None,
    max_image_size: MaxImageSize = None,
    max_local_epochs: MaxLocalEpochs = None,
    max_kd_epochs: MaxKdEpochs = None,
    max_rounds: MaxRounds = None,
    max_teacher_parameters: MaxTeacherParameters = None,
    phases: Phases = None,
    policy_path: PolicyOption = None,
) -> None:
    """Read every image of a site's data set and print counts per class, view and patient."""
    from common.data.sources import load_catalog
    from common.run_settings import check_image_size
    from common.tasks import get_task

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    limits = _limits(
        max_image_size, max_local_epochs, max_kd_epochs, max_rounds, max_teacher_parameters, phases
    )
    try:
        check_image_size("--image-size", image_size)
        policy = _site_policy(image_size, _policy_file(policy_path), **limits)
        task_obj = get_task(task)
        catalog = load_catalog(fmt, data, task_obj, options=_parse_options(option), strict=strict)
        cached = _decode_images(catalog, image_size, cache_dir, strict)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    where = f" at {data}" if data is not None else ""
    console.print(
        f"[bold]{fmt}{where}[/]: {len(cached.catalog)} readable images, task {task_obj.name}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(_class_table(cached.catalog, task_obj))
    console.print(_site_facts(cached, policy, image_size))
    if catalog.left_out:
        console.print(_left_out_table(catalog.left_out))
    _print_unreadable(cached.skipped)


def _decode_images(catalog: Catalog, image_size: int, cache_dir: Path | None, strict: bool) -> CachedImages:
    """Every image of ``catalog`` decoded into the cache, with a progress bar."""
    from common.data.cache import build_cache

    with _progress_bar() as bar:
        job = bar.add_task("decoding images", total=len(catalog))
        return build_cache(
            catalog,
            image_size,
            cache_dir,
            strict=strict,
            progress=lambda done, _t: bar.update(job, completed=done),
        )


def _class_table(usable: Catalog, task: Task) -> Table:
    """Images and share per class (per finding, and those with none, for a multi-label task)."""
    table = Table()
    table.add_column("finding" if task.is_multilabel else "class")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    for name, count in usable.class_counts().items():
        table.add_row(name, str(count), f"{count / max(len(usable), 1):.1%}")
    if task.is_multilabel:
        none = int((usable.primary_labels() == task.num_classes).sum())
        table.add_row("(no finding)", str(none), f"{none / max(len(usable), 1):.1%}")
    return table


def _site_facts(cached: CachedImages, policy: SitePolicy, image_size: int) -> Table:
    """Patients, views, sources, unreadable files, the site policy and the cache of a checked site."""
    usable = cached.catalog
    facts = Table(show_header=False, title="site facts", title_justify="left")
    patients = {r.patient_id for r in usable.records if r.patient_id is not None}
    unknown_patient = sum(r.patient_id is None for r in usable.records)
    facts.add_row(
        "patients",
        f"{len(patients)}" + (f" (+{unknown_patient} images without id)" if unknown_patient else ""),
    )
    views = Counter(r.view or "unknown" for r in usable.records)
    facts.add_row("views", ", ".join(f"{v} {n}" for v, n in views.most_common()))
    sites = Counter(r.site for r in usable.records if r.site)
    if sites:
        facts.add_row("sources/sites", ", ".join(f"{s} {n}" for s, n in sites.most_common(5)))
    facts.add_row("unreadable files", str(len(cached.skipped)))
    facts.add_row("site policy", _policy_text(policy))
    facts.add_row("cache", f"{cached.path} ({cached.nbytes_on_disk / 1e6:.1f} MB, {image_size} px)")
    return facts


def _left_out_table(left_out: dict[str, int]) -> Table:
    """The files a source left out, by reason (most first)."""
    table = Table(title="left out by the source", title_justify="left")
    table.add_column("reason")
    table.add_column("files", justify="right")
    for reason, count in sorted(left_out.items(), key=lambda item: (-item[1], item[0])):
        table.add_row(reason, str(count))
    return table


def _print_unreadable(skipped: tuple[SkippedImage, ...]) -> None:
    """The first 20 unreadable images and why, on stderr."""
    for item in skipped[:20]:
        err_console.print(
            f"[yellow]unreadable:[/] {item.key}: {item.reason}", highlight=False, soft_wrap=True
        )


@app.command()
def predict(
    model: Annotated[
        Path,
        typer.Argument(help="Exported ONNX model; its <name>.preprocessing.json must sit beside it."),
    ],
    images: Annotated[
        Path, typer.Argument(help="An image file, or a folder searched recursively for images.")
    ],
    csv_out: Annotated[
        Path | None,
        typer.Option("--csv", help="Write one CSV row per image here instead of printing a table."),
    ] = None,
    threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime intra-op threads.")] = 2,
    ignore_operating_point: IgnoreOperatingPoint = False,
) -> None:
    """Class probabilities and the decision per image with ONNX Runtime, preprocessed exactly like
    training; the decision is taken at the site's operating point the export carries."""
    import csv

    from common.export import OnnxPredictor, list_images

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        predictor = OnnxPredictor(model, num_threads=threads, use_operating_point=not ignore_operating_point)
        paths = list_images(images)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    if not paths:
        raise fail(f"no image files (.png, .jpg, .jpeg, .bmp, .tif, .tiff) found under '{images}'")
    predictions = predictor.predict_files(paths)
    classes = predictor.preprocessing.classes
    for bad in (p for p in predictions if p.error):
        err_console.print(f"[yellow]warning:[/] skipped {bad.path}: {bad.error}", highlight=False)
    readable = [p for p in predictions if p.probabilities is not None]
    if csv_out is not None:
        with open(csv_out, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "predicted", *classes, "error"])
            for p in predictions:
                probs = p.probabilities or {}
                writer.writerow(
                    [
                        str(p.path),
                        p.decided or "",
                        *(f"{probs[c]:.6f}" if probs else "" for c in classes),
                        p.error or "",
                    ]
                )
        console.print(f"wrote {len(readable)} prediction(s) to {csv_out}", highlight=False)
    else:
        activation = predictor.preprocessing.activation
        rule = predictor.decision_rule.describe()
        table = Table(
            title=f"{model.name} ({activation} probabilities; decided by {rule})", title_justify="left"
        )
        table.add_column("image", overflow="fold")
        table.add_column("predicted")
        for c in classes:
            table.add_column(c, justify="right")
        for p in readable:
            probs = p.probabilities or {}
            table.add_row(str(p.path), p.decided or "", *(f"{probs[c]:.3f}" for c in classes))
        console.print(table)
    if not readable:
        raise fail(f"none of the {len(predictions)} image(s) could be read")


def _parse_class_thresholds(values: list[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in values or []:
        name, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name.strip() or not 0.0 <= number <= 1.0:
            raise fail(
                f"--class-threshold {item!r}: expected CLASS=PROBABILITY between 0 and 1, "
                "e.g. --class-threshold pneumonia=0.3"
            )
        out[name.strip()] = number
    return out


@app.command()
def evaluate(
    model: EvaluatedModel,
    fmt: DataFormat,
    data: LabelledData = None,
    out: EvaluationOut = Path("evaluation"),
    task: EvaluationTask = None,
    bootstrap: Bootstrap = 1000,
    seed: BootstrapSeed = 0,
    threshold: Threshold = None,
    class_threshold: ClassThresholds = None,
    bins: CalibrationBins = 10,
    option: LabelledSourceOptions = None,
    strict: Strict = False,
    cache_dir: CacheDir = None,
    threads: InferenceThreads = 2,
    ignore_operating_point: IgnoreOperatingPoint = False,
) -> None:
    """Validate a model on the site's labelled images: AUROC with 95% CIs, operating points, calibration.

    Sensitivity, specificity and balanced accuracy are given at the argmax and at the site's
    operating point the model carries (``--threshold``/``--class-threshold`` replace it)."""
    from common.evaluation import EvaluationSettings, load_labelled_images, parse_thresholds, write_report

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    per_class = _parse_class_thresholds(class_threshold)
    try:
        scorer = _scoring_model(model, task, threads)
        settings = EvaluationSettings(
            n_bootstrap=bootstrap,
            seed=seed,
            calibration_bins=bins,
            thresholds=parse_thresholds(scorer.task, threshold, per_class),
            operating_point=None if ignore_operating_point else scorer.operating_point,
        )
        with _progress_bar() as bar:
            decode = bar.add_task("decoding images", total=None)
            cached = load_labelled_images(
                fmt,
                data,
                scorer.task,
                scorer.image_size,
                cache_dir=cache_dir,
                options=_parse_options(option),
                strict=strict,
                progress=lambda done, total: bar.update(decode, completed=done, total=total),
            )
            result = _score_and_evaluate(bar, scorer, cached, settings)
        write_report(result, out, model=scorer.describe(), data=_evaluated_data(fmt, data, cached))
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    _print_unreadable(cached.skipped)
    _print_evaluation(result, f"{model.name} on {len(cached)} images", bootstrap)
    console.print(f"report: {out / 'evaluation.md'} (+ evaluation.json, 3 PNG figures)", highlight=False)


def _scoring_model(model: Path, task: str | None, threads: int) -> ScoringModel:
    """The model ``evaluate`` scores with, on ``threads`` threads; its task must be ``--task``'s."""
    import torch

    from common.evaluation import load_scoring_model
    from common.tasks import get_task

    torch.set_num_threads(threads)
    scorer = load_scoring_model(model, num_threads=threads)
    if task is not None and get_task(task).name != scorer.task.name:
        raise fail(
            f"model '{model}' was trained for task '{scorer.task.name}' "
            f"({', '.join(scorer.task.classes)}), not '{task}'; evaluate it on data of its own task"
        )
    return scorer


def _score_and_evaluate(
    bar: Progress, scorer: ScoringModel, cached: CachedImages, settings: EvaluationSettings
) -> EvaluationResult:
    """Score every image (progress on ``bar``), then the figures with their bootstrap intervals."""
    from common.evaluation import evaluate_scores, score_images

    score = bar.add_task("scoring", total=len(cached))
    scores = score_images(scorer, cached.images, progress=lambda done, _t: bar.update(score, completed=done))
    bar.add_task(f"bootstrap ({settings.n_bootstrap} resamples)", total=None)
    return evaluate_scores(scorer.task, cached.catalog.targets, scores, settings)


def _evaluated_data(fmt: str, data: Path | None, cached: CachedImages) -> dict[str, Any]:
    """What the evaluation report says of the data it was computed on."""
    return {
        "format": fmt,
        "path": str(data) if data is not None else None,
        "images": len(cached),
        "unreadable": len(cached.skipped),
        "class_counts": cached.catalog.class_counts(),
    }


def _print_evaluation(result: EvaluationResult, title: str, bootstrap: int) -> None:
    """The evaluation's table and summary lines on the console."""
    from common.evaluation import format_interval, format_value

    table = Table(
        title=f"{title} ({result.task.name}; 95% bootstrap CI, {bootstrap} resamples)",
        title_justify="left",
    )
    for column in (
        "finding" if result.task.is_multilabel else "class",
        "AUROC",
        "sensitivity",
        "specificity",
    ):
        table.add_column(column)
    for c in result.classes:
        table.add_row(
            c.name, format_interval(c.auroc), format_interval(c.sensitivity), format_interval(c.specificity)
        )
    table.add_row("[bold]macro[/]", format_interval(result.auroc_macro), "", "")
    console.print(table)
    console.print(
        f"balanced accuracy {format_interval(result.balanced_accuracy)} at {result.operating_point}; "
        f"expected calibration error {format_value(result.ece)}",
        highlight=False,
        soft_wrap=True,
    )
    if result.site_balanced_accuracy is None:
        return
    console.print(
        f"at the {result.site_rule}: balanced accuracy {format_interval(result.site_balanced_accuracy)}",
        highlight=False,
        soft_wrap=True,
    )
    for c in result.classes:
        if c.site_sensitivity is not None and c.site_specificity is not None:
            console.print(
                f"  {c.name}: sensitivity {format_interval(c.site_sensitivity)}, "
                f"specificity {format_interval(c.site_specificity)}",
                highlight=False,
                soft_wrap=True,
            )


@app.command()
def explain(
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            help="A site student folder (holding student.pt), or a .pt file with its .json beside it.",
        ),
    ],
    image: Annotated[Path, typer.Option("--image", help="An image file, or a folder searched recursively.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the Grad-CAM PNG overlays.")],
    layer: Annotated[
        str | None,
        typer.Option("--layer", help="Dotted module name to explain (default: the model's usual layer)."),
    ] = None,
    class_name: Annotated[
        str | None, typer.Option("--class", help="Explain this class instead of the decided one.")
    ] = None,
    ignore_operating_point: IgnoreOperatingPoint = False,
) -> None:
    """Grad-CAM heat maps of a student's (or teacher's) decisions, saved as PNG overlays.

    The decided class is the one chosen at the site's operating point the model carries."""
    from common.export import list_images, load_torch_model
    from common.gradcam import grad_cam, resolve_layer, save_overlay
    from common.models import get_spec
    from common.operating_point import OperatingPoint

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        loaded = load_torch_model(model)
        layer_name = layer or get_spec(loaded.config.name).gradcam_layer
        resolve_layer(loaded.model, layer_name)
        class_index = None if class_name is None else loaded.task.index(class_name)
        paths = list_images(image)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    if not paths:
        raise fail(f"no image files (.png, .jpg, .jpeg, .bmp, .tif, .tiff) found under '{image}'")
    prep = loaded.preprocessing
    rule = prep.decision_rule if not ignore_operating_point else OperatingPoint.argmax(loaded.task)
    out.mkdir(parents=True, exist_ok=True)
    table = Table(
        title=f"Grad-CAM of {loaded.config.name} at layer '{layer_name}'; decided by {rule.describe()}",
        title_justify="left",
    )
    for column in ("image", "decided", "explained class", "probability", "overlay"):
        table.add_column(column, overflow="fold")
    written = 0
    for path in paths:
        try:
            grey = prep.load_grey(path)
            decided, decided_index = _decision(loaded, rule, prep.normalise(grey))
            which = decided_index if class_index is None else class_index
            result = grad_cam(
                loaded.model, prep.normalise(grey), loaded.task, layer=layer_name, class_index=which
            )
        except CxrFlError as exc:
            err_console.print(f"[yellow]warning:[/] skipped {path}: {exc}", highlight=False)
            continue
        target = out / f"{path.stem}.gradcam.png"
        save_overlay(grey, result, target, title=path.name)
        table.add_row(str(path), decided, result.class_name, f"{result.probability:.3f}", str(target))
        written += 1
    console.print(table)
    if not written:
        raise fail(f"none of the {len(paths)} image(s) could be read")


def _decision(loaded: LoadedModel, rule: OperatingPoint, image: Any) -> tuple[str, int | None]:
    """The decision at ``rule`` on one preprocessed image ``[C, S, S]``, and the class to explain
    (the decided one; multi-label: None, the finding of highest probability)."""
    import numpy as np
    import torch

    with torch.no_grad():
        logits = loaded.model(torch.from_numpy(np.ascontiguousarray(image[None]))).float().numpy()
    decided = rule.decided_names(loaded.preprocessing.probabilities(logits))[0]
    return decided, None if loaded.task.is_multilabel else loaded.task.index(decided)


@app.command()
def start(
    server: ServerAddress,
    site: SiteName,
    fmt: DataFormat,
    out: SiteOut,
    data: DataPath = None,
    ca: CaCert = None,
    key: SiteKey = None,
    insecure: Insecure = False,
    epsilon: Epsilon = None,
    delta: Delta = None,
    max_grad_norm: MaxGradNorm = None,
    accountant: Accountant = None,
    privacy_ledger: PrivacyLedgerPath = None,
    state_dir: StateDir = None,
    share_per_class_metrics: SharePerClassMetrics = False,
    share_exact_metrics: ShareExactMetrics = False,
    share_delivered_student: ShareDeliveredStudent = False,
    operating_point: OperatingPointCriterion = "balanced-accuracy",
    threads: TrainThreads = 2,
    device: Device = "auto",
    task: CheckTask = "normal-pneumonia-covid",
    image_size: CheckImageSize = 64,
    skip_check: SkipCheck = False,
    connect_timeout: ConnectTimeout = 120.0,
    reconnect_timeout: ReconnectTimeout = 600.0,
    activate_timeout: ActivateTimeout = 75.0,
    allow_app: AllowApp = None,
    supernode_memory: SupernodeMemory = 4.0,
    initial_teacher_sha256: InitialTeacherSha256 = None,
    initial_teacher: InitialTeacher = None,
    max_image_size: MaxImageSize = None,
    max_local_epochs: MaxLocalEpochs = None,
    max_kd_epochs: MaxKdEpochs = None,
    max_rounds: MaxRounds = None,
    max_teacher_parameters: MaxTeacherParameters = None,
    phases: Phases = None,
    policy_path: PolicyOption = None,
) -> None:
    """Check the site's data, then join the federation (Flower SuperNode) until the run ends."""
    options = dict(locals())  # the options by name, as typer converted them (Path, not str)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = options["out"] = out.resolve()
    if insecure:
        _warning("--insecure: no TLS, no site authentication (tests only)")
    try:
        policy_file = _policy_file(policy_path)
        settings = _site_node_settings(options, policy_file)
        used = _check_runtime(settings)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    if policy_file is not None and policy_file.cache_max_age_days is not None:
        _expire_cache(out / "cache", policy_file.cache_max_age_days)
    if not skip_check:
        check(
            fmt=fmt,
            data=data,
            task=task,
            image_size=image_size,
            cache_dir=out / "cache",
            policy_path=policy_path,
            **_limits_of(options),
        )
    console.print(
        f"[bold]{site}[/]: joining {server}, training on {used}; logs in {out / 'supernode.log'}",
        highlight=False,
    )
    _run_site(settings)


def _warning(text: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {text}", highlight=False)


NODE_OPTIONS = {
    "server": "server",
    "site": "site",
    "data_format": "fmt",
    "data_path": "data",
    "out_dir": "out",
    "ca_cert": "ca",
    "private_key": "key",
    "insecure": "insecure",
    "state_dir": "state_dir",
    "num_threads": "threads",
    "device": "device",
    "connect_timeout": "connect_timeout",
    "reconnect_timeout": "reconnect_timeout",
    "activate_timeout": "activate_timeout",
    "supernode_memory_gib": "supernode_memory",
    "initial_teacher_sha256": "initial_teacher_sha256",
    "initial_teacher": "initial_teacher",
}
"""SiteNodeSettings fields that ``start`` takes from its options as they are (field: option)."""
PRIVACY_OPTIONS = {
    "dp-target-epsilon": "epsilon",
    "dp-target-delta": "delta",
    "dp-max-grad-norm": "max_grad_norm",
    "dp-accountant": "accountant",
    "privacy-ledger": "privacy_ledger",
    "share-per-class-metrics": "share_per_class_metrics",
    "share-exact-metrics": "share_exact_metrics",
    "share-delivered-student": "share_delivered_student",
}
"""The site's privacy among ``start``'s options (node config key: option; client/site_privacy.py)."""


def _site_node_settings(options: dict[str, Any], policy_file: PolicyFile | None) -> SiteNodeSettings:
    """``start``'s options as the site's SuperNode settings: its privacy and its limits (each
    tightened by ``policy_file``), its operating point and the rest, checked."""
    from client.deploy import SiteNodeSettings
    from client.site_privacy import SitePrivacy

    own = {key: options[name] for key, name in PRIVACY_OPTIONS.items()}
    return SiteNodeSettings(
        **{field: options[name] for field, name in NODE_OPTIONS.items()},
        privacy=SitePrivacy.from_options(own, policy_file),
        allowed_apps=tuple(options["allow_app"] or ()),
        policy=_site_policy(options["image_size"], policy_file, **_limits_of(options)),
        operating_point=_criterion_option(options["operating_point"], options["task"]),
        stay=_SERVING.get(),
    )


def _check_runtime(settings: SiteNodeSettings) -> str:
    """The Flower the warm runner needs, and the device the site trains on (no CUDA for
    ``cuda``: stop here)."""
    from common.device import resolve_device
    from flower_adapter.app_runner import require_supported_flwr

    require_supported_flwr()
    return str(resolve_device(settings.device, option="--device"))


def _run_site(settings: SiteNodeSettings) -> None:
    """Run the site's SuperNode until the run ends (exit 1 when refused, 130 when stopped)."""
    from client.deploy import SiteNode, SiteRefusedError

    node = SiteNode(settings)
    exit_on_sigterm()
    try:
        outcome = node.run(
            lambda event: console.print(f"{time.strftime('%H:%M:%S')} {event}", highlight=False)
        )
    except SiteRefusedError as exc:
        raise fail(f"refused: {exc}", 1) from None
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    except (KeyboardInterrupt, SystemExit) as exc:
        node.stop()
        how = "Ctrl-C" if isinstance(exc, KeyboardInterrupt) else "terminated"
        console.print(f"stopped ({how})")
        raise typer.Exit(130) from None
    console.print(f"[bold green]{outcome}[/]", highlight=False)


_SERVING: contextvars.ContextVar[bool] = contextvars.ContextVar("serving", default=False)
"""True while ``serve`` runs ``start``'s code: the site stays connected across runs."""


@app.command("serve")
@functools.wraps(start)
def serve(*args: Any, **kwargs: Any) -> None:
    token = _SERVING.set(True)
    try:
        start(*args, **kwargs)
    finally:
        _SERVING.reset(token)


serve.__doc__ = (
    "Check the site's data, then stay connected across runs (a long-running Flower SuperNode).\n\n"
    "Takes part in each run its policy and allow-list accept and declines the others with the reason "
    "the coordinator sees; each run's outputs go to OUT/runs/<run id>/, the privacy ledger and audit "
    "trail (--state-dir) are one for all runs; a coordinator that restarts is waited for. Stops on "
    "Ctrl-C or SIGTERM (exit code 130, a clean stop for the kit's systemd unit). Same options as start."
)


def _expiry_note(expires: Any) -> None:
    """When the coordinator's certificate expires; a warning within EXPIRY_WARNING_DAYS."""
    import datetime

    from common.pki import EXPIRY_WARNING_DAYS

    left = (expires - datetime.datetime.now(datetime.UTC)).total_seconds() / 86400.0
    line = f"the coordinator's certificate expires {expires:%Y-%m-%d} ({left:.0f} days)"
    if left < EXPIRY_WARNING_DAYS:
        err_console.print(
            f"[bold yellow]warning:[/] {line}: ask the coordinator for a new kit", highlight=False
        )
    else:
        console.print(f"  {line}", highlight=False)


def _expire_cache(cache_dir: Path, days: int) -> None:
    """Remove decoded images older than the site policy's ``cache-max-age-days``."""
    from common.data.cache import clear_cache

    cleared = clear_cache(cache_dir, float(days))
    if cleared.files:
        console.print(
            f"removed {cleared.files} cache file(s) decoded over {days} days ago (site policy)",
            highlight=False,
        )


@app.command()
def init(
    kit: KitFolder,
    site_dir: SiteFolder,
    fmt: DataFormat,
    data: DataPath = None,
    task: LabelTask = "normal-pneumonia-covid",
    image_size: InitImageSize = 64,
    max_image_size: MaxImageSize = None,
    max_local_epochs: MaxLocalEpochs = None,
    max_kd_epochs: MaxKdEpochs = None,
    max_rounds: MaxRounds = None,
    max_teacher_parameters: MaxTeacherParameters = None,
    phases: Phases = None,
    cache_max_age_days: CacheMaxAgeDays = None,
    epsilon: PolicyEpsilon = None,
) -> None:
    """Set this site up from a kit: its own key pair (0600), its policy, a data check."""
    from client.onboarding import set_up_site
    from common.kit import read_kit
    from common.site_limits import PolicyFile

    limits = _limits(
        max_image_size, max_local_epochs, max_kd_epochs, max_rounds, max_teacher_parameters, phases
    )
    own = {
        **{name.replace("_", "-"): value for name, value in limits.items()},
        "cache-max-age-days": cache_max_age_days,
        "dp-target-epsilon": epsilon,
    }
    try:
        facts = read_kit(kit)
        policy = PolicyFile.from_mapping({k: v for k, v in own.items() if v is not None}, "option")
        setup = set_up_site(facts, site_dir, policy, data=data, fmt=fmt, task=task, image_size=image_size)
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    console.print(f"[bold]{facts.site}[/]: set up in {setup.folder} for {facts.server}", highlight=False)
    console.print(
        f"  key pair: {setup.public_key.with_suffix('.key')} (private, 0600; stays here)"
        + ("" if setup.new_key else " (kept from before)"),
        highlight=False,
    )
    console.print(f"  policy: {_policy_text(setup.policy.limits)}")
    console.print(
        f"  the coordinator's runs carry app hash {facts.app_hash} (review it; see the kit's README)"
    )
    _expiry_note(facts.expires)
    check(
        fmt=fmt,
        data=data,
        task=task,
        image_size=image_size,
        cache_dir=setup.folder / "out" / "cache",
        policy_path=setup.folder / "site-policy.toml",
    )
    console.print(
        f"send only {setup.public_key} to the coordinator (cxr-fl-server register-site "
        f"{setup.public_key.name} --name {facts.site})",
        highlight=False,
    )
    console.print(f"then join with {setup.folder / 'start.sh'}:", highlight=False)
    console.print(" ".join(setup.start_command), highlight=False, soft_wrap=True)


@app.command("app-hash")
def app_hash() -> None:
    """Print the app hash (FAB SHA-256) that this site accepts by default: its installed cxr-fl's."""
    from flower_adapter.app_runner import PROJECT_ROOT, installed_app_hash

    try:
        value = installed_app_hash()
    except CxrFlError as exc:
        raise fail(str(exc)) from None
    err_console.print(f"app bundle of the cxr-fl installed at {PROJECT_ROOT}:", highlight=False)
    console.print(value, highlight=False)


def main() -> None:
    """Console-script entry point (``cxr-fl-client``)."""
    app()


if __name__ == "__main__":
    main()
