"""One short check of a site's GPU path: a ResNet18 teacher round at 224 px on CUDA and on the CPU.

Rows (the same synthetic images, one local epoch each, through the code a site runs:
``common.local.train_round``, ``evaluate_state`` and ``distill_student``):

- CPU float32 (the baseline), CUDA float32, CUDA mixed precision (``amp``),
- CUDA with DP-SGD (Opacus, GroupNorm teacher; mixed precision is off under DP),
- CUDA distillation of the MobileNetV2 student with mixed precision, then ONNX export of the
  student (always on the CPU) and an ONNX Runtime parity check against the CUDA model.

It prints a table (seconds per round, images/s, peak GPU memory, loss) and exits 1 when a row
fails. Without CUDA it stops at once with exit 2 and says so (nothing was measured).

    .venv/bin/python benchmarks/gpu_check.py [--images 256] [--image-size 224] [--json]
    .venv/bin/python benchmarks/gpu_check.py --smoke   # CPU-only rehearsal of the script itself
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.config import ModelConfig, PrivacyConfig  # noqa: E402
from common.device import Compute, ComputeConfig, resolve_compute  # noqa: E402
from common.local import (  # noqa: E402
    DataRequest,
    SiteData,
    distill_student,
    evaluate_state,
    load_site_data,
    train_round,
)
from common.run_settings import FederatedRunConfig, check_run_config, run_settings_from_config  # noqa: E402
from common.tasks import get_task  # noqa: E402

TASK = get_task("normal-pneumonia-covid")


def row_settings(teacher_name: str, batch: int, **overrides: Any) -> FederatedRunConfig:
    """A row's run settings through the one loader (pyproject's defaults, every value and rule checked)."""
    return run_settings_from_config(
        check_run_config(
            {
                "teacher-name": teacher_name,
                "teacher-norm": "batch",
                "batch-size": batch,
                "lr": 0.01,
                "kd-epochs": 1,
                "kd-batch-size": batch,
                **overrides,
            }
        )
    )


def site_data(images: int, image_size: int, cache: Path) -> SiteData:
    request = DataRequest(
        data_format="synthetic",
        data_path=None,
        task=TASK,
        image_size=image_size,
        cache_dir=cache,
        val_fraction=0.1,
        test_fraction=0.1,
        split_seed=0,
        options=(("n_images", images), ("image_size", image_size), ("seed", 1)),
    )
    return load_site_data(request)


def timed_row(name: str, compute: Compute, work: Callable[[], dict[str, float]]) -> dict[str, Any]:
    if compute.device.type == "cuda":
        torch.cuda.synchronize(compute.device)
        torch.cuda.reset_peak_memory_stats(compute.device)
    started = time.perf_counter()
    row: dict[str, Any] = {"row": name, "device": compute.describe()}
    try:
        row.update(work())
        row["ok"] = True
    except Exception as exc:  # a failing row is reported, the others still run
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    if compute.device.type == "cuda":
        torch.cuda.synchronize(compute.device)
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated(compute.device) / 1e9
    row["seconds"] = time.perf_counter() - started
    return row


def warm_up(teacher: ModelConfig, compute: Compute, batch: int, image_size: int) -> None:
    """One forward/backward pass in float32 and in float16 so CUDA start-up is not in the first row."""
    from common.device import autocast
    from common.models import build_model

    model = build_model(teacher, TASK.num_classes).to(compute.device)
    images = torch.randn(batch, teacher.in_channels, image_size, image_size, device=compute.device)
    for amp in (False, True):
        with autocast(compute.device, amp):
            loss = model(images).float().sum()
        loss.backward()
    torch.cuda.synchronize(compute.device)


def train_row(data: SiteData, settings: FederatedRunConfig, compute: Compute) -> dict[str, float]:
    teacher = settings.teacher
    privacy: PrivacyConfig | None = settings.privacy if settings.privacy.enabled else None
    outcome = train_round(
        data,
        TASK,
        teacher,
        None,
        replace(settings.train, num_threads=max(1, torch.get_num_threads())),
        seed=0,
        privacy=privacy,
        num_rounds=1,
        compute=compute,
    )
    result = evaluate_state(data, "val", TASK, teacher, outcome.state_dict, compute=compute)
    metrics = {
        "train_s": outcome.metrics["train_seconds"],
        "images_per_s": outcome.metrics["images_per_s"],
        "loss": outcome.metrics["loss"],
        "val_loss": result.loss,
    }
    if "dp_epsilon" in outcome.metrics:
        metrics["dp_epsilon"] = outcome.metrics["dp_epsilon"]
    return metrics


def distill_row(
    data: SiteData, settings: FederatedRunConfig, compute: Compute, image_size: int, out: Path
) -> dict[str, float]:
    import numpy as np

    from common.export import export_onnx, make_session, run_session

    teacher = settings.teacher
    # two threads: what this row has been measured with (TrainConfig's default before it became pyproject's 1)
    train = replace(settings.train, num_threads=2)
    state = train_round(data, TASK, teacher, None, train, seed=0, compute=compute).state_dict
    outcome = distill_student(
        data,
        TASK,
        teacher,
        state,
        settings.distill,
        norm=teacher.norm,
        seed=0,
        num_threads=max(1, torch.get_num_threads()),
        compute=compute,
    )
    path = export_onnx(outcome.student, out / "student.onnx", image_size, teacher.in_channels)
    images = np.stack([data.dataset("test")[i][0].numpy() for i in range(min(8, len(data.split.test)))])
    onnx_logits = run_session(make_session(path), images)
    student = outcome.student.to(compute.device).eval()
    with torch.no_grad():
        torch_logits = student(torch.from_numpy(images).to(compute.device)).float().cpu().numpy()
    return {
        "train_s": outcome.metrics["distill_seconds"],
        "student_loss": outcome.metrics["student_loss"],
        "onnx_max_abs_diff": float(np.abs(onnx_logits - torch_logits).max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=256, help="synthetic images in all (10%% val, 10%% test)"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpu-images", type=int, default=96, help="images of the (slow) CPU row")
    parser.add_argument("--smoke", action="store_true", help="rehearse on the CPU: tiny model, 32 px")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    if args.smoke:
        cuda = cpu = Compute()
        teacher_name, args.image_size, args.images, args.cpu_images = "tiny-cnn", 32, 64, 64
    else:
        if not torch.cuda.is_available():
            print(
                f"gpu_check: CUDA is not available here (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda}); nothing was measured. Run it on a machine with an NVIDIA GPU.",
                file=sys.stderr,
            )
            return 2
        cuda_fp32 = resolve_compute(ComputeConfig("cuda", amp=False))
        cuda = resolve_compute(ComputeConfig("cuda", amp=True))
        cpu = resolve_compute(ComputeConfig("cpu"))
        teacher_name = "resnet18"
    batch = args.batch_size
    plain = row_settings(teacher_name, batch)
    dp_settings = {"teacher-norm": "group", "dp-enabled": True, "dp-target-epsilon": 8.0}
    dp = row_settings(teacher_name, batch, **dp_settings, **{"dp-max-physical-batch-size": batch})
    teacher = plain.teacher
    rows = []
    with tempfile.TemporaryDirectory(prefix="cxr-fl-gpu-check-") as tmp:
        work = Path(tmp)
        data = site_data(args.images, args.image_size, work / "cache")
        cpu_data = site_data(args.cpu_images, args.image_size, work / "cache")
        if not args.smoke:
            warm_up(teacher, cuda, batch, args.image_size)
        rows.append(timed_row("teacher round, CPU fp32", cpu, lambda: train_row(cpu_data, plain, cpu)))
        if not args.smoke:
            rows.append(
                timed_row("teacher round, CUDA fp32", cuda_fp32, lambda: train_row(data, plain, cuda_fp32))
            )
        rows.append(timed_row("teacher round, CUDA amp", cuda, lambda: train_row(data, plain, cuda)))
        rows.append(timed_row("teacher round, CUDA DP-SGD", cuda, lambda: train_row(data, dp, cuda)))
        rows.append(
            timed_row(
                "distil + ONNX export, CUDA amp",
                cuda,
                lambda: distill_row(data, plain, cuda, args.image_size, work),
            )
        )
    where = "CPU rehearsal (--smoke), not a GPU measurement" if args.smoke else torch.cuda.get_device_name()
    print(
        f"\n{teacher_name} teacher, {args.image_size} px, batch {batch}, one local epoch over "
        f"{len(data.split.train)} images ({len(cpu_data.split.train)} on the CPU row); {where}\n"
    )
    print("| row | device | ok | round s | train images/s | peak GPU GB | loss | notes |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        notes = r.get("error", "")
        if "dp_epsilon" in r:
            notes = f"epsilon {r['dp_epsilon']:.2f}"
        if "onnx_max_abs_diff" in r:
            notes = f"ONNX vs CUDA max |diff| {r['onnx_max_abs_diff']:.2e}"
        loss = r.get("loss", r.get("student_loss", math.nan))
        print(
            f"| {r['row']} | {r['device']} | {'yes' if r['ok'] else 'NO'} | {r['seconds']:.1f} | "
            f"{r.get('images_per_s', math.nan):.1f} | {r.get('peak_gpu_gb', math.nan):.2f} | {loss:.3f} | "
            f"{notes} |"
        )
    if args.json:
        print(json.dumps({"settings": vars(args), "rows": rows}))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
