"""What a site writes after distillation: the deployable student and its papers.

:func:`export_site_student` fills ``<site out_dir>/student/``:

==================================== =========================================================
``student.onnx``                     ONNX (opset 17, input ``image``, output ``logits``),
                                     checked against PyTorch with ONNX Runtime on test images
``student.preprocessing.json``       image size, resize geometry, normalisation, classes,
                                     softmax/sigmoid, input/output names, the site's operating
                                     point (read by ``predict``)
``student.torchscript.pt``           TorchScript (traced)
``student.pt`` (+ ``.sha256``,       PyTorch state_dict and the metadata needed to rebuild the
``.json``)                           model (ModelConfig, task, image size): what ``explain`` loads
``teacher.pt`` (+ sidecars)          only with ``EdgeExportOptions(save_teacher=True)``
``model_card.md`` / ``.json``        see :mod:`common.model_card`
``compression.md`` / ``.json``       only with ``EdgeExportOptions(compression=True)``
==================================== =========================================================

Only the scalars returned by :func:`export_site_student` (parity, latency, size, parameters,
FLOPs) may travel to the server; files stay at the site.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.site import SiteConfig
from common.checkpoint import save_model, sha256_file
from common.compression import compare_compression, write_compression_report
from common.config import ModelConfig
from common.data.dataset import normalise
from common.data.preprocess import equalize_images
from common.export import (
    Latency,
    Preprocessing,
    check_onnx_parity,
    export_onnx,
    export_torchscript,
    model_metadata,
    onnx_latency,
    write_preprocessing,
)
from common.jsonio import write_json
from common.local import DeliveredStudent, DistillOutcome, SiteData
from common.local import student_config as distilled_student_config
from common.model_card import ModelCard, split_metrics, write_model_card
from common.models import count_flops, count_parameters
from common.operating_point import OperatingPoint
from common.run_settings import FederatedRunConfig
from common.tasks import Task

logger = logging.getLogger(__name__)

STUDENT_DIR = "student"


@dataclass(frozen=True)
class EdgeExportOptions:
    """Knobs of the edge export.

    ``compression`` builds the compression table (exports the teacher and two pruned copies to
    ONNX, quantises the student twice and times all of them: minutes with a large teacher).
    ``save_teacher`` also stores the teacher's state_dict so ``cxr-fl-client explain`` can
    explain teacher decisions (it is as large as the teacher).
    """

    parity_images: int = 8
    latency_repeats: int = 50
    num_threads: int = 2
    compression: bool = False
    compression_repeats: int = 20
    compression_test_images: int = 200
    calibration_images: int = 16
    save_teacher: bool = False


def _images(data: SiteData, part: str, limit: int, in_channels: int = 1) -> np.ndarray:
    """Normalised float32 ``[n, C, S, S]`` of the first ``limit`` images of a split (grey
    images repeated over the model's ``in_channels``)."""
    rows = np.asarray(getattr(data.split, part))[:limit]
    pixels = np.asarray(data.cached.images[rows])
    if data.equalize:  # as in training (run setting preprocess-equalize)
        pixels = equalize_images(pixels)
    images = normalise(pixels).unsqueeze(1).numpy()
    return np.repeat(images, in_channels, axis=1) if in_channels != 1 else images


def _class_counts(data: SiteData, task: Task) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    targets = data.catalog.targets
    for part in ("train", "val", "test"):
        rows = np.asarray(getattr(data.split, part))
        sums = np.nansum(targets[rows], axis=0) if len(rows) else np.zeros(task.num_classes)
        out[part] = {c: int(n) for c, n in zip(task.classes, sums, strict=True)}
    return out


def is_synthetic(site: SiteConfig, data: SiteData) -> bool:
    if site.data_format == "synthetic":
        return True
    return any(r.source.split(":")[0] == "synthetic" for r in data.catalog.records)


def export_site_student(
    site: SiteConfig,
    settings: FederatedRunConfig,
    data: SiteData,
    outcome: DistillOutcome,
    metrics: dict[str, float],
    *,
    teacher_epsilon: float | None,
    options: EdgeExportOptions | None = None,
    subdir: str = STUDENT_DIR,
    delivered: DeliveredStudent | None = None,
    operating_point: OperatingPoint | None = None,
) -> dict[str, float]:
    """Write the student's ONNX, TorchScript, preprocessing, weights and model card; return scalars.

    ``subdir`` is the folder under the site's output (``student``, or ``global_student`` for
    the consortium's federated student). ``operating_point``: the site's decision rule of this
    student (its preprocessing JSON, weights metadata and model card carry it; it stays here).

    Raises ModelError when ONNX Runtime disagrees with PyTorch by more than 1e-4.
    """
    opts = options or EdgeExportOptions()
    out = Path(site.out_dir) / subdir
    out.mkdir(parents=True, exist_ok=True)
    student = outcome.student.eval()
    teacher = outcome.teacher.eval()
    written = _write_student(student, out, settings, operating_point)
    if not site.simulated:
        _audit_export(site, subdir, written.onnx)
    if opts.save_teacher:
        written.files.append(_write_teacher(teacher, out, settings))
    figures = _edge_figures(student, teacher, written.onnx, data, settings, opts)
    logger.info(
        "site %s: student ONNX %.2f MB, %.2f ms (ORT, %d threads), parity %.2e",
        site.name,
        figures.size_mb,
        figures.latency.median_ms,
        opts.num_threads,
        figures.max_diff,
    )
    if opts.compression:
        _compression(teacher, student, data, settings, opts, written, site.name)
    delivered = delivered or _site_only(settings)
    facts = _CardFacts(metrics, teacher_epsilon, delivered, written, figures, opts.num_threads)
    write_model_card(_model_card(site, settings, data, facts), out)
    record_delivered(Path(site.out_dir), subdir, delivered)
    return figures.scalars()


@dataclass
class _Written:
    """The student's files as written: its ONNX model, its preprocessing, every file to hash."""

    onnx: Path
    preprocessing: Preprocessing
    files: list[Path]


def _write_student(
    student: torch.nn.Module, out: Path, settings: FederatedRunConfig, operating_point: OperatingPoint | None
) -> _Written:
    """ONNX (with its preprocessing JSON), TorchScript, and the weights with their metadata."""
    task, image_size, in_channels = settings.task, settings.run.image_size, settings.teacher.in_channels
    equalize = settings.run.preprocess_equalize
    onnx_path = export_onnx(student, out / "student.onnx", image_size, in_channels)
    prep = Preprocessing.for_task(
        task, image_size, in_channels, equalize=equalize, operating_point=operating_point
    )
    prep_path = write_preprocessing(prep, onnx_path)
    script_path = export_torchscript(student, out / "student.torchscript.pt", image_size, in_channels)
    weights_path = out / "student.pt"
    config = distilled_student_config(settings.distill, settings.teacher, settings.teacher.norm)
    metadata = model_metadata(
        config, task, image_size, "student", equalize=equalize, operating_point=operating_point
    )
    save_model(student, weights_path, metadata=metadata)
    return _Written(onnx_path, prep, [onnx_path, prep_path, script_path, weights_path])


def _audit_export(site: SiteConfig, subdir: str, onnx_path: Path) -> None:
    """The export in a deployed site's audit trail, with the ONNX file's hash."""
    from client.site_audit import record_site_event

    record_site_event(
        site.state_dir,
        "model-exported",
        model=subdir,
        formats="onnx, torchscript, weights",
        onnx_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    )


def _write_teacher(teacher: torch.nn.Module, out: Path, settings: FederatedRunConfig) -> Path:
    """The teacher's weights beside the student (``EdgeExportOptions(save_teacher=True)``)."""
    teacher_path = out / "teacher.pt"
    metadata = model_metadata(
        replace_weights(settings.teacher),
        settings.task,
        settings.run.image_size,
        "teacher",
        equalize=settings.run.preprocess_equalize,
    )
    save_model(teacher, teacher_path, metadata=metadata)
    return teacher_path


@dataclass(frozen=True)
class _EdgeFigures:
    """What the edge export measured: ONNX parity and latency, size, parameters, FLOPs."""

    max_diff: float
    latency: Latency
    size_mb: float
    parameters: int
    flops: int
    teacher_parameters: int
    parity_images: int

    def scalars(self) -> dict[str, float]:
        """The figures that may travel to the server."""
        return {
            "onnx_max_abs_diff": self.max_diff,
            "student_onnx_ms": self.latency.median_ms,
            "student_size_mb": self.size_mb,
            "student_parameters": float(self.parameters),
            "student_mflops": self.flops / 1e6,
        }


def _edge_figures(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    onnx_path: Path,
    data: SiteData,
    settings: FederatedRunConfig,
    opts: EdgeExportOptions,
) -> _EdgeFigures:
    """ONNX Runtime against PyTorch on a few test images (train images without a test split),
    the ONNX latency and size, the student's parameters and FLOPs, the teacher's parameters."""
    image_size, in_channels = settings.run.image_size, settings.teacher.in_channels
    part = "test" if len(data.split.test) else "train"
    parity_images = _images(data, part, opts.parity_images, in_channels)
    max_diff = check_onnx_parity(student, onnx_path, parity_images, num_threads=opts.num_threads)
    latency = onnx_latency(
        onnx_path, image_size, in_channels, num_threads=opts.num_threads, repeats=opts.latency_repeats
    )
    return _EdgeFigures(
        max_diff=max_diff,
        latency=latency,
        size_mb=onnx_path.stat().st_size / 1e6,
        parameters=count_parameters(student),
        flops=count_flops(student, image_size, in_channels),
        teacher_parameters=count_parameters(teacher),
        parity_images=len(parity_images),
    )


def _compression(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    data: SiteData,
    settings: FederatedRunConfig,
    opts: EdgeExportOptions,
    written: _Written,
    site_name: str,
) -> None:
    """The compression table (``EdgeExportOptions(compression=True)``): the teacher, pruned and
    quantised copies timed beside the student; each quantised model gets the preprocessing."""
    image_size, in_channels = settings.run.image_size, settings.teacher.in_channels
    out = written.onnx.parent
    test_images = _images(data, "test", opts.compression_test_images, in_channels)
    test_targets = data.catalog.targets[np.asarray(data.split.test)[: opts.compression_test_images]]
    calibration = _images(data, "train", opts.calibration_images, in_channels)
    rows, compression_settings = compare_compression(
        teacher,
        student,
        settings.task,
        test_images,
        test_targets,
        calibration,
        out / "compression",
        image_size=image_size,
        in_channels=in_channels,
        num_threads=opts.num_threads,
        repeats=opts.compression_repeats,
        student_onnx=written.onnx,
    )
    write_compression_report(rows, compression_settings, out, title=f"Compression comparison: {site_name}")
    for quantised in sorted((out / "compression").glob("*.onnx")):
        write_preprocessing(written.preprocessing, quantised)


@dataclass(frozen=True)
class _CardFacts:
    """What the model card says beyond the run's settings and the site's data."""

    metrics: dict[str, float]
    teacher_epsilon: float | None
    delivered: DeliveredStudent
    written: _Written
    figures: _EdgeFigures
    num_threads: int


def _model_card(
    site: SiteConfig, settings: FederatedRunConfig, data: SiteData, facts: _CardFacts
) -> ModelCard:
    """The student's model card (common/model_card.py)."""
    task, figures = settings.task, facts.figures
    return ModelCard(
        model_name=f"{settings.distill.student} (width {settings.distill.width_mult:g})",
        site=site.name,
        task=task.name,
        task_kind=task.kind,
        classes=tuple(task.classes),
        image_size=settings.run.image_size,
        data_source=site.data_format,
        synthetic_data=is_synthetic(site, data),
        data_counts={k: int(v) for k, v in data.counts().items()},
        class_counts=_class_counts(data, task),
        metrics=split_metrics(facts.metrics),
        teacher={
            "name": settings.teacher.name,
            "norm": settings.teacher.norm,
            "parameters": figures.teacher_parameters,
        },
        teacher_dp_epsilon=facts.teacher_epsilon,
        distillation=_distillation_facts(settings, facts.delivered),
        size_mb=figures.size_mb,
        parameters=figures.parameters,
        flops=figures.flops,
        latency={
            "median_ms": figures.latency.median_ms,
            "p90_ms": figures.latency.p90_ms,
            "runtime": "ONNX Runtime CPU",
            "batch": 1,
            "threads": facts.num_threads,
            "repeats": figures.latency.repeats,
            "warmup": figures.latency.warmup,
            "torch_threads": torch.get_num_threads(),
            "parity_images": figures.parity_images,
        },
        onnx_max_abs_diff=figures.max_diff,
        files={path.name: sha256_file(path) for path in facts.written.files},
        operating_point=facts.written.preprocessing.decision_rule.describe(),
    )


def _distillation_facts(settings: FederatedRunConfig, delivered: DeliveredStudent) -> dict[str, object]:
    """The model card's KD settings, and which student this site delivers and why."""
    d = settings.distill
    return {
        "student": d.student,
        "width_mult": d.width_mult,
        "temperature": d.temperature,
        "alpha": d.alpha,
        "epochs": d.epochs,
        "batch_size": d.batch_size,
        "lr": d.lr,
        "cache_teacher_logits": d.cache_teacher_logits,
        "seed": d.seed,
        "recalibrate_bn": d.recalibrate_bn,
        "mix": d.mix,
        "schedule": d.schedule,
        "select_best": d.select_best,
        "delivered": delivered.choice,
        "delivered_because": delivered.reason,
    }


def _site_only(settings: FederatedRunConfig) -> DeliveredStudent:
    note = "distilled at this site only"
    if settings.kd_federated_student_rounds > 0:
        note += (
            " (the run goes on to a federated student, exported in global_student/; when it"
            f" arrives, {DELIVERED_FILE} names it as the student to deploy)"
        )
    return DeliveredStudent("site", note)


DELIVERED_FILE = "delivered.json"
"""In a site's output folder: which student folder to deploy, and why (the latest export wins)."""


def record_delivered(site_dir: Path, subdir: str, delivered: DeliveredStudent) -> None:
    """Point ``site_dir/delivered.json`` at the student folder this site deploys.

    The site student is exported first and recorded; a federated student exported after it
    (``global_student``, possibly personalised) replaces the record. A run whose federated
    student never arrives leaves the site student recorded, so the file always names a
    complete export.
    """
    write_json(
        site_dir / DELIVERED_FILE,
        {
            "folder": subdir,
            "onnx": f"{subdir}/student.onnx",
            "model_card": f"{subdir}/model_card.md",
            "delivered": delivered.choice,
            "delivered_because": delivered.reason,
        },
    )


def replace_weights(config: ModelConfig) -> ModelConfig:
    """The config without its (site-local, pre-training) weights file: the saved state replaces it."""
    from dataclasses import replace

    return replace(config, weights=None)
