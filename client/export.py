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
    task = settings.task
    image_size = settings.run.image_size
    in_channels = settings.teacher.in_channels
    out = Path(site.out_dir) / subdir
    out.mkdir(parents=True, exist_ok=True)
    student = outcome.student.eval()
    teacher = outcome.teacher.eval()
    student_config = distilled_student_config(settings.distill, settings.teacher, settings.teacher.norm)

    onnx_path = export_onnx(student, out / "student.onnx", image_size, in_channels)
    equalize = settings.run.preprocess_equalize
    prep = Preprocessing.for_task(
        task, image_size, in_channels, equalize=equalize, operating_point=operating_point
    )
    prep_path = write_preprocessing(prep, onnx_path)
    script_path = export_torchscript(student, out / "student.torchscript.pt", image_size, in_channels)
    weights_path = out / "student.pt"
    save_model(
        student,
        weights_path,
        metadata=model_metadata(
            student_config, task, image_size, "student", equalize=equalize, operating_point=operating_point
        ),
    )
    files = [onnx_path, prep_path, script_path, weights_path]
    if not site.simulated:
        from client.site_audit import record_site_event

        record_site_event(
            site.state_dir,
            "model-exported",
            model=subdir,
            formats="onnx, torchscript, weights",
            onnx_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        )
    if opts.save_teacher:
        teacher_path = out / "teacher.pt"
        teacher_meta = model_metadata(
            replace_weights(settings.teacher), task, image_size, "teacher", equalize=equalize
        )
        save_model(teacher, teacher_path, metadata=teacher_meta)
        files.append(teacher_path)

    part = "test" if len(data.split.test) else "train"
    parity_images = _images(data, part, opts.parity_images, in_channels)
    max_diff = check_onnx_parity(student, onnx_path, parity_images, num_threads=opts.num_threads)
    latency = onnx_latency(
        onnx_path, image_size, in_channels, num_threads=opts.num_threads, repeats=opts.latency_repeats
    )
    size_mb = onnx_path.stat().st_size / 1e6
    parameters = count_parameters(student)
    flops = count_flops(student, image_size, in_channels)
    teacher_parameters = count_parameters(teacher)
    logger.info(
        "site %s: student ONNX %.2f MB, %.2f ms (ORT, %d threads), parity %.2e",
        site.name,
        size_mb,
        latency.median_ms,
        opts.num_threads,
        max_diff,
    )

    if opts.compression:
        test_images = _images(data, "test", opts.compression_test_images, in_channels)
        test_targets = data.catalog.targets[np.asarray(data.split.test)[: opts.compression_test_images]]
        calibration = _images(data, "train", opts.calibration_images, in_channels)
        rows, compression_settings = compare_compression(
            teacher,
            student,
            task,
            test_images,
            test_targets,
            calibration,
            out / "compression",
            image_size=image_size,
            in_channels=in_channels,
            num_threads=opts.num_threads,
            repeats=opts.compression_repeats,
            student_onnx=onnx_path,
        )
        write_compression_report(
            rows, compression_settings, out, title=f"Compression comparison: {site.name}"
        )
        for quantised in sorted((out / "compression").glob("*.onnx")):
            write_preprocessing(prep, quantised)

    card = ModelCard(
        model_name=f"{settings.distill.student} (width {settings.distill.width_mult:g})",
        site=site.name,
        task=task.name,
        task_kind=task.kind,
        classes=tuple(task.classes),
        image_size=image_size,
        data_source=site.data_format,
        synthetic_data=is_synthetic(site, data),
        data_counts={k: int(v) for k, v in data.counts().items()},
        class_counts=_class_counts(data, task),
        metrics=split_metrics(metrics),
        teacher={
            "name": settings.teacher.name,
            "norm": settings.teacher.norm,
            "parameters": teacher_parameters,
        },
        teacher_dp_epsilon=teacher_epsilon,
        distillation=_distillation_facts(settings, delivered or _site_only(settings)),
        size_mb=size_mb,
        parameters=parameters,
        flops=flops,
        latency={
            "median_ms": latency.median_ms,
            "p90_ms": latency.p90_ms,
            "runtime": "ONNX Runtime CPU",
            "batch": 1,
            "threads": opts.num_threads,
            "repeats": latency.repeats,
            "warmup": latency.warmup,
            "torch_threads": torch.get_num_threads(),
            "parity_images": len(parity_images),
        },
        onnx_max_abs_diff=max_diff,
        files={path.name: sha256_file(path) for path in files},
        operating_point=prep.decision_rule.describe(),
    )
    write_model_card(card, out)
    record_delivered(Path(site.out_dir), subdir, delivered or _site_only(settings))
    return {
        "onnx_max_abs_diff": max_diff,
        "student_onnx_ms": latency.median_ms,
        "student_size_mb": size_mb,
        "student_parameters": float(parameters),
        "student_mflops": flops / 1e6,
    }


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
