"""Benchmark of the edge story: teacher vs KD student vs int8 students vs pruned teachers.

Builds the compression table of :mod:`common.compression` at ``--image-size`` (224 px by
default) with ``--threads`` ONNX Runtime threads (2 by default): size, non-zero parameters,
median batch-1 latency, accuracy and macro AUROC, plus the teacher/student latency ratio and
the ONNX-vs-PyTorch parity of the student.

Models are **randomly initialised** (no pretrained weights can be downloaded here; latency and
size do not depend on the weights). The accuracy and AUROC columns are computed on a small
*synthetic* test set (``--test-images`` procedurally drawn images) and are therefore chance-level
numbers that only show the columns are wired; they say nothing about real radiographs.

Targets of the project (issue "Site distillation"): student ONNX Runtime latency <= 8 ms at
batch 1, and teacher/student latency ratio >= 50x.

    .venv/bin/python benchmarks/edge.py                  # 224 px, 2 threads, a few minutes
    .venv/bin/python benchmarks/edge.py --json           # the same, JSON object on the last line
    .venv/bin/python benchmarks/edge.py --teacher resnet18 --image-size 64 --teacher-repeats 5

The dual teacher takes about 300 ms per image in ONNX Runtime at 224 px, so it is timed with
fewer repeats (``--teacher-repeats``) than the students. Numbers on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from rich import box
from rich.console import Console
from rich.table import Table

from common.compression import compare_compression
from common.config import ModelConfig
from common.data.cache import build_cache
from common.data.dataset import normalise
from common.data.sources import load_catalog
from common.export import check_onnx_parity, export_onnx, torch_latency
from common.models import build_model, count_flops
from common.tasks import get_task

STUDENT_LATENCY_TARGET_MS = 8.0
RATIO_TARGET = 50.0


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="resnet50v2-vgg19")
    parser.add_argument("--student", default="mobilenetv2")
    parser.add_argument("--width-mult", type=float, default=1.0, help="student width multiplier")
    parser.add_argument("--task", default="normal-pneumonia-covid")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per student variant")
    parser.add_argument("--teacher-repeats", type=int, default=10, help="timed runs per teacher variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--test-images", type=int, default=24)
    parser.add_argument("--calibration-images", type=int, default=8)
    parser.add_argument("--prune", default="0.5,0.8", help="comma-separated pruning amounts ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return parser.parse_args()


def _synthetic_images(
    task_name: str, n: int, size: int, seed: int, cache_dir: Path
) -> tuple[np.ndarray, np.ndarray]:
    task = get_task(task_name)
    catalog = load_catalog(
        "synthetic",
        None,
        task,
        options={"n-images": n, "image-size": size, "seed": seed, "max-images-per-patient": 1},
    )
    cached = build_cache(catalog, size, cache_dir)
    images = normalise(np.array(cached.images)).unsqueeze(1).numpy()
    return images, np.asarray(cached.catalog.targets)


def main() -> None:
    args = _parse()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=args.json, width=170)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    prune_amounts = tuple(float(a) for a in args.prune.split(",") if a.strip())
    started = time.perf_counter()
    teacher = build_model(ModelConfig(name=args.teacher, norm="batch"), task.num_classes).eval()
    student_config = ModelConfig(name=args.student, norm="batch", width_mult=args.width_mult)
    student = build_model(student_config, task.num_classes).eval()
    with tempfile.TemporaryDirectory(prefix="cxr-fl-edge-") as tmp:
        work = Path(tmp)
        n = args.test_images + args.calibration_images
        images, targets = _synthetic_images(args.task, n, args.image_size, args.seed, work / "cache")
        test_images, test_targets = images[: args.test_images], targets[: args.test_images]
        calibration = images[args.test_images :]
        student_onnx = export_onnx(student, work / "student.onnx", args.image_size)
        parity = check_onnx_parity(student, student_onnx, test_images[:8], num_threads=args.threads)
        eager = torch_latency(student, args.image_size, repeats=args.repeats, warmup=args.warmup)
        rows, settings = compare_compression(
            teacher,
            student,
            task,
            test_images,
            test_targets,
            calibration,
            work,
            image_size=args.image_size,
            num_threads=args.threads,
            repeats=args.repeats,
            warmup=args.warmup,
            teacher_repeats=args.teacher_repeats,
            prune_amounts=prune_amounts,
            student_onnx=student_onnx,
        )
    by_name = {r.name: r for r in rows}
    teacher_ms = by_name["teacher"].latency_ms
    student_ms = by_name["student-kd"].latency_ms
    ratio = teacher_ms / student_ms if student_ms > 0 else math.nan
    flops = {
        "teacher": count_flops(teacher, args.image_size),
        "student": count_flops(student, args.image_size),
    }
    elapsed = time.perf_counter() - started

    table = Table(
        title=f"Edge compression, {args.image_size} px, batch 1, {args.threads} threads (ONNX Runtime "
        f"{onnxruntime.__version__}, CPU)",
        box=box.MARKDOWN,
        title_justify="left",
    )
    for column, justify in (
        ("model", "left"),
        ("size MB", "right"),
        ("size counted as", "left"),
        ("params (non-zero)", "right"),
        ("latency ms (median)", "right"),
        ("teacher/this", "right"),
        ("accuracy*", "right"),
        ("AUROC*", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(
            r.name,
            f"{r.size_mb:.2f}",
            r.size_basis,
            f"{r.parameters:,}",
            f"{r.latency_ms:.2f}",
            f"{teacher_ms / r.latency_ms:.1f}x",
            f"{r.accuracy:.3f}",
            "n/a" if math.isnan(r.auroc_macro) else f"{r.auroc_macro:.3f}",
        )
    console.print(table)
    console.print(
        f"teacher {args.teacher} ({flops['teacher'] / 1e9:.2f} GFLOPs), student {args.student} width "
        f"{args.width_mult:g} ({flops['student'] / 1e9:.3f} GFLOPs; 2 FLOPs per multiply-add). "
        "Latency: median of "
        f"{args.repeats} runs per student variant and {args.teacher_repeats} per teacher variant, after "
        f"{args.warmup} (students) / {min(args.warmup, 2)} (teachers) warm-up runs. "
        "Student in PyTorch eager: "
        f"{eager.median_ms:.2f} ms. Student ONNX vs PyTorch max abs logit difference: {parity:.2e}.",
        highlight=False,
    )
    console.print(
        f"* random-init models scored on {args.test_images} synthetic test images: "
        "chance-level, wiring only. "
        f"Static int8 calibrated on {args.calibration_images} synthetic images. "
        "Pruned sizes = non-zero params x "
        "4 bytes; their ONNX files are dense, hence teacher-like latency.",
        highlight=False,
    )
    latency_ok = student_ms <= STUDENT_LATENCY_TARGET_MS
    ratio_ok = ratio >= RATIO_TARGET
    console.print(
        f"targets: student ONNX {student_ms:.2f} ms <= {STUDENT_LATENCY_TARGET_MS:g} ms: "
        f"{'met' if latency_ok else 'NOT met'}; teacher/student {ratio:.1f}x >= {RATIO_TARGET:g}x: "
        f"{'met' if ratio_ok else 'NOT met'}. Machine: {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, total {elapsed:.0f} s.",
        highlight=False,
    )
    if args.json:
        payload: dict[str, Any] = {
            "student_onnx_ms": student_ms,
            "teacher_onnx_ms": teacher_ms,
            "teacher_student_ratio": ratio,
            "student_torch_ms": eager.median_ms,
            "student_onnx_max_abs_diff": parity,
            "targets": {
                "student_onnx_ms_max": STUDENT_LATENCY_TARGET_MS,
                "teacher_student_ratio_min": RATIO_TARGET,
                "student_latency_met": latency_ok,
                "ratio_met": ratio_ok,
            },
            "flops": flops,
            "settings": {**vars(args), **asdict(settings), "teacher_repeats": args.teacher_repeats},
            "rows": [
                {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()}
                for r in rows
            ],
            "elapsed_s": elapsed,
        }
        print(json.dumps(payload))


if __name__ == "__main__":
    main()
