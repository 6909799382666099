"""Compression comparison for one site: teacher, KD student, int8 students and pruned teachers.

Rows (all run in ONNX Runtime on the CPU with the same threads, batch 1 for latency):

================== ==========================================================================
``teacher``        the global teacher, ONNX fp32
``student-kd``     the distilled student, ONNX fp32
``student-int8-dynamic``  ``onnxruntime.quantization.quantize_dynamic`` (uint8 weights,
                   activations quantised at run time)
``student-int8-static``   ``quantize_static`` (QDQ, int8, per-tensor) calibrated with
                   :class:`ImageCalibrationReader` over a few *training* images
``teacher-pruned-50`` / ``-80``  ``torch.nn.utils.prune.global_unstructured`` L1 magnitude
                   pruning of all conv and linear weights at 50% / 80%, then ``prune.remove``
================== ==========================================================================

How size is counted (``size_mb``, 1 MB = 10^6 bytes): for dense rows the ONNX file on disk; for
pruned rows **non-zero parameters x 4 bytes** (fp32 values of a sparse store, index overhead not
counted), because the ONNX file of a pruned model keeps its zeros and is as large as the
teacher's. ``parameters`` counts non-zero parameter elements for every row (for int8 rows the
student's parameter count: quantisation shrinks bytes, not parameters). Unstructured sparsity
does not speed up dense ONNX Runtime kernels, so pruned rows show the teacher's latency; and on
CPUs without VNNI, static int8 may be slower than fp32. The table reports what was measured.

Accuracy and macro AUROC are computed on the images given (the site's test split) with
:func:`common.metrics.compute_metrics`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.nn.utils import prune

from common.errors import ModelError
from common.export import export_onnx, make_session, run_session
from common.markdown import table_lines
from common.metrics import compute_metrics
from common.tasks import Task

logger = logging.getLogger(__name__)

PRUNE_AMOUNTS: tuple[float, ...] = (0.5, 0.8)
BYTES_PER_PARAMETER = 4


@dataclass(frozen=True)
class CompressionRow:
    """One model variant: size, parameters, latency and test metrics."""

    name: str
    description: str
    size_mb: float
    size_basis: str
    parameters: int
    latency_ms: float
    accuracy: float
    auroc_macro: float


@dataclass(frozen=True)
class CompressionSettings:
    image_size: int
    num_threads: int
    repeats: int
    warmup: int
    test_images: int
    calibration_images: int
    prune_amounts: tuple[float, ...]
    teacher_repeats: int


def nonzero_parameters(model: nn.Module) -> int:
    """Parameter elements that are not exactly zero."""
    return int(sum(int((p != 0).sum()) for p in model.parameters()))


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def prune_model(model: nn.Module, amount: float) -> nn.Module:
    """A copy of ``model`` with the ``amount`` smallest-|w| conv/linear weights (globally) set to 0."""
    if not 0.0 < amount < 1.0:
        raise ModelError(f"prune amount must lie in (0, 1), got {amount}")
    pruned = copy.deepcopy(model).eval()
    targets = prunable_weights(pruned)
    if not targets:
        raise ModelError(f"{type(model).__name__} has no Conv2d or Linear weights to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in targets:
        prune.remove(module, name)
    return pruned


class ImageCalibrationReader:
    """ONNX Runtime CalibrationDataReader over preprocessed images, one per batch."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self._images = np.asarray(images, dtype=np.float32)
        self._input_name = input_name
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = ({self._input_name: x[None]} for x in self._images)
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


class _QuietQuantizer(logging.Filter):
    """Drops ONNX Runtime quantisation chatter (it logs WARNINGs per node on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or "quantization" not in record.pathname


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    quiet = _QuietQuantizer()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def unshare_initializers(source: Path, target: Path) -> Path:
    """A copy of the ONNX model in which every weight is its own initializer.

    The exporter stores identical tensors once (e.g. the all-zero folded weights of an untrained
    MobileNetV2's zero-gamma blocks) and feeds the other users through ``Identity`` nodes, or
    shares the initializer; ONNX Runtime's quantiser, which rewrites each node's weights in place,
    then fails ("Expected ... to be an initializer"). Each ``Identity`` of an initializer becomes a
    copy of it, and a second reader of an initializer gets its own copy."""
    import onnx

    model = onnx.load(str(source))
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}

    def add_copy(of: str, name: str) -> None:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[of])
        copy.name = name
        graph.initializer.append(copy)
        initializers[name] = copy

    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]:
        add_copy(node.input[0], node.output[0])
        graph.node.remove(node)
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        for position, name in enumerate(node.input):
            if name in initializers and name in seen:
                add_copy(name, f"{name}__copy{index}_{position}")
                node.input[position] = f"{name}__copy{index}_{position}"
            seen.add(name)
    onnx.save(model, str(target))
    return target


def quantize_dynamic_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantisation (uint8 weights: ORT's CPU ConvInteger has no int8-weight kernel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    unshared = unshare_initializers(source, target.with_suffix(".unshared.onnx"))
    try:
        with _quiet_quantizer():
            quantize_dynamic(str(unshared), str(target), weight_type=QuantType.QUInt8)
    finally:
        unshared.unlink(missing_ok=True)
    return target


def quantize_static_int8(source: Path, target: Path, calibration: np.ndarray) -> Path:
    """Static int8 quantisation (QDQ) calibrated on ``calibration`` images ``[N, C, S, S]``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if len(calibration) == 0:
        raise ModelError("static quantisation needs at least one calibration image (training split is empty)")
    name = make_session(source, 1).get_inputs()[0].name

    class _Reader(ImageCalibrationReader, CalibrationDataReader):
        pass

    unshared = unshare_initializers(source, target.with_suffix(".unshared.onnx"))
    try:
        with _quiet_quantizer():
            quantize_static(
                str(unshared),
                str(target),
                _Reader(calibration, name),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )
    finally:
        unshared.unlink(missing_ok=True)
    return target


def _metrics(task: Task, probabilities: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    if len(targets) == 0:
        return math.nan, math.nan
    metrics = compute_metrics(task, targets, probabilities)
    return float(metrics.accuracy), float(metrics.auroc_macro)


def _probabilities(task: Task, logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    if task.is_multilabel:
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class _Variant:
    name: str
    description: str
    path: Path
    parameters: int
    size_mb: float
    size_basis: str
    slow: bool
    runs_ms: list[float] = field(default_factory=list)


def _time_round_robin(
    variants: Sequence[_Variant],
    image_size: int,
    in_channels: int,
    *,
    num_threads: int,
    repeats: int,
    slow_repeats: int,
    warmup: int,
    rounds: int = 5,
) -> None:
    """Batch-1 ONNX Runtime latency of every variant, timed in interleaved rounds.

    Each round times every variant a few times in turn, so a change of machine load during the
    run (other processes on a shared machine) affects all variants alike instead of whichever
    happened to be measured at that moment.
    """
    x = np.random.default_rng(0).standard_normal((1, in_channels, image_size, image_size)).astype(np.float32)
    sessions = [make_session(v.path, num_threads) for v in variants]
    names = [s.get_inputs()[0].name for s in sessions]
    for v, session, name in zip(variants, sessions, names, strict=True):
        for _ in range(min(warmup, 2) if v.slow else warmup):
            session.run(None, {name: x})
    for round_index in range(rounds):
        for v, session, name in zip(variants, sessions, names, strict=True):
            total = slow_repeats if v.slow else repeats
            share = total // rounds + (1 if round_index < total % rounds else 0)
            for _ in range(share):
                start = time.perf_counter()
                session.run(None, {name: x})
                v.runs_ms.append((time.perf_counter() - start) * 1000.0)


def _student_variants(
    student: nn.Module, student_onnx: Path, calibration_images: np.ndarray, work_dir: Path
) -> list[_Variant]:
    """The fp32 KD student and its two int8 quantisations (dynamic and static)."""
    student_params = nonzero_parameters(student)
    dynamic_path = quantize_dynamic_int8(student_onnx, work_dir / "student-int8-dynamic.onnx")
    static_path = quantize_static_int8(
        student_onnx, work_dir / "student-int8-static.onnx", calibration_images
    )
    return [
        _Variant(name, description, path, student_params, path.stat().st_size / 1e6, "ONNX file", False)
        for name, description, path in (
            ("student-kd", "KD student, ONNX fp32", student_onnx),
            ("student-int8-dynamic", "KD student, ORT dynamic int8 (uint8 weights)", dynamic_path),
            (
                "student-int8-static",
                f"KD student, ORT static int8 QDQ ({len(calibration_images)} calibration images)",
                static_path,
            ),
        )
    ]


def _pruned_teachers(
    teacher: nn.Module,
    prune_amounts: Sequence[float],
    work_dir: Path,
    image_size: int,
    in_channels: int,
    temporary: list[Path],
) -> list[_Variant]:
    """The teacher pruned by each amount, exported as dense ONNX (files added to ``temporary``)."""
    variants = []
    for amount in prune_amounts:
        pruned = prune_model(teacher, amount)
        nonzero = nonzero_parameters(pruned)
        label = f"teacher-pruned-{round(amount * 100)}"
        path = export_onnx(pruned, work_dir / f"{label}.onnx", image_size, in_channels)
        del pruned
        temporary.append(path)
        variants.append(
            _Variant(
                label,
                f"teacher, global L1 unstructured pruning {amount:.0%} of conv/linear weights, "
                "ONNX fp32 (dense)",
                path,
                nonzero,
                nonzero * BYTES_PER_PARAMETER / 1e6,
                "non-zero params x 4 B",
                True,
            )
        )
    return variants


def _score(
    v: _Variant, task: Task, test_images: np.ndarray, test_targets: np.ndarray, num_threads: int
) -> tuple[float, float]:
    """Accuracy and macro-AUROC of a variant on the test images (ONNX Runtime)."""
    logits = run_session(make_session(v.path, num_threads), test_images, batch_size=16)
    return _metrics(task, _probabilities(task, logits), test_targets)


def _row(v: _Variant, accuracy: float, auroc: float) -> CompressionRow:
    """A variant's table row (median latency of its timed runs)."""
    latency = statistics.median(v.runs_ms)
    logger.info("%s: %.2f MB, %.2f ms, accuracy %.3f", v.name, v.size_mb, latency, accuracy)
    return CompressionRow(
        v.name, v.description, v.size_mb, v.size_basis, v.parameters, latency, accuracy, auroc
    )


def compare_compression(
    teacher: nn.Module,
    student: nn.Module,
    task: Task,
    test_images: np.ndarray,
    test_targets: np.ndarray,
    calibration_images: np.ndarray,
    work_dir: Path,
    *,
    image_size: int,
    in_channels: int = 1,
    num_threads: int = 2,
    repeats: int = 30,
    warmup: int = 3,
    teacher_repeats: int | None = None,
    prune_amounts: Sequence[float] = PRUNE_AMOUNTS,
    student_onnx: Path | None = None,
    keep_files: bool = False,
) -> tuple[list[CompressionRow], CompressionSettings]:
    """Build every variant under ``work_dir``, measure it, and return the rows of the table.

    ``test_images`` ``[N, C, S, S]`` are preprocessed (normalised) images of the site's test
    split with their ``test_targets`` ``[N, C]``; ``calibration_images`` come from the training
    split. ``student_onnx`` reuses an already exported student. ``teacher_repeats`` (default
    ``repeats``) lets slow teachers be timed fewer times (and warmed up at most twice).
    Latencies are timed round-robin over all variants (see :func:`_time_round_robin`).
    Intermediate teacher ONNX files are deleted unless ``keep_files``; the int8 students stay.
    """
    if repeats < 1 or (teacher_repeats is not None and teacher_repeats < 1):
        raise ModelError(f"latency repeats must be >= 1, got {repeats} / {teacher_repeats}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    slow_repeats = teacher_repeats or repeats
    settings = CompressionSettings(
        image_size,
        num_threads,
        repeats,
        warmup,
        len(test_images),
        len(calibration_images),
        tuple(prune_amounts),
        slow_repeats,
    )
    temporary: list[Path] = []
    teacher_path = export_onnx(teacher, work_dir / "teacher.onnx", image_size, in_channels)
    temporary.append(teacher_path)
    variants = [
        _Variant(
            "teacher",
            f"{type(teacher).__name__}, ONNX fp32",
            teacher_path,
            nonzero_parameters(teacher),
            teacher_path.stat().st_size / 1e6,
            "ONNX file",
            True,
        )
    ]
    if student_onnx is None:
        student_onnx = export_onnx(student, work_dir / "student-fp32.onnx", image_size, in_channels)
        temporary.append(student_onnx)
    variants += _student_variants(student, student_onnx, calibration_images, work_dir)
    variants += _pruned_teachers(teacher, prune_amounts, work_dir, image_size, in_channels, temporary)
    scores = {v.name: _score(v, task, test_images, test_targets, num_threads) for v in variants}
    _time_round_robin(
        variants,
        image_size,
        in_channels,
        num_threads=num_threads,
        repeats=repeats,
        slow_repeats=slow_repeats,
        warmup=warmup,
    )
    rows = [_row(v, *scores[v.name]) for v in variants]
    if not keep_files:
        for path in temporary:
            if path.parent == work_dir:
                path.unlink(missing_ok=True)
    return rows, settings


def rows_to_markdown(
    rows: Sequence[CompressionRow], settings: CompressionSettings, *, title: str = ""
) -> str:
    """The comparison as a markdown table with its settings and notes."""
    teacher = next((r for r in rows if r.name == "teacher"), None)
    lines = [f"# {title}" if title else "# Compression comparison", ""]
    lines.append(
        f"ONNX Runtime (CPU), {settings.image_size} px, batch 1, {settings.num_threads} threads, median of "
        f"{settings.repeats} runs per student and {settings.teacher_repeats} per teacher variant (timed "
        f"round-robin, after {settings.warmup} warm-up runs); accuracy and macro AUROC on "
        f"{settings.test_images} test images; static int8 calibrated on "
        f"{settings.calibration_images} training images."
    )
    lines.append("")
    header = [
        "model",
        "size MB",
        "size counted as",
        "parameters (non-zero)",
        "latency ms",
        "speed-up vs teacher",
        "accuracy",
        "AUROC (macro)",
    ]
    cells = []
    for r in rows:
        speedup = teacher.latency_ms / r.latency_ms if teacher and r.latency_ms > 0 else math.nan
        cells.append(
            [
                r.name,
                f"{r.size_mb:.2f}",
                r.size_basis,
                f"{r.parameters:,}",
                f"{r.latency_ms:.2f}",
                f"{speedup:.1f}x",
                _fmt(r.accuracy),
                _fmt(r.auroc_macro),
            ]
        )
    lines += table_lines(header, cells, align="lrlrrrrr")
    lines.append("")
    lines.append(
        "Pruned rows: size = non-zero parameters x 4 bytes (a sparse fp32 store, index overhead not "
        "counted); "
        "their ONNX files are dense, so ONNX Runtime runs them at the teacher's speed. Static int8 may be "
        "slower than fp32 on CPUs without VNNI; these are the measured numbers."
    )
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def write_compression_report(
    rows: Sequence[CompressionRow], settings: CompressionSettings, out_dir: Path, *, title: str = ""
) -> tuple[Path, Path]:
    """``compression.md`` and ``compression.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "compression.md"
    md.write_text(rows_to_markdown(rows, settings, title=title), encoding="utf-8")
    js = out_dir / "compression.json"
    payload = {"settings": asdict(settings), "rows": [_json_row(r) for r in rows]}
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return md, js


def _json_row(row: CompressionRow) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(row).items()}
