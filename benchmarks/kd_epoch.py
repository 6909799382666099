"""Cost of one distillation epoch: live teacher vs cached teacher logits vs a plain student epoch.

All three run the same loop (``common.distillation.distill_one_epoch``) on the same images:
``plain`` trains the student on labels alone (no teacher), ``cached`` looks the teacher's logits
up (computed once beforehand, not timed), ``live`` runs the teacher on every batch the student
sees (consistent distillation; with mixup the teacher scores the mixed batch). Prints a markdown
table of median seconds per epoch and the ratio to the plain epoch.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/kd_epoch.py --image-size 64 --images 256 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.distillation import IndexedDataset, compute_teacher_logits, distill_one_epoch
from common.local import student_config
from common.models import build_model
from common.run_settings import check_run_config, run_settings_from_config
from common.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="mobilenetv2")
    parser.add_argument("--mix", default="mixup", help="mixing of the live row (none, mixup, cutmix)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("normal-pneumonia-covid")
    g = torch.Generator().manual_seed(0)
    images = torch.rand((args.images, 1, args.image_size, args.image_size), generator=g)
    targets = F.one_hot(torch.arange(args.images) % 3, 3).float()
    dataset = TensorDataset(images, targets)
    settings = run_settings_from_config(  # the one loader: pyproject's defaults, every value checked
        check_run_config(
            {
                "teacher-name": args.teacher,
                "teacher-norm": "batch",
                "kd-student": args.student,
                "kd-cache-teacher-logits": False,
            }
        )
    )
    teacher = build_model(settings.teacher, 3).eval()
    cfg = settings.distill
    cache = compute_teacher_logits(teacher, DataLoader(IndexedDataset(dataset), batch_size=128), len(dataset))
    rows = {
        "plain student (labels only)": (None, dataset, "none"),
        "KD, cached teacher logits": (cache, IndexedDataset(dataset), "none"),
        "KD, live teacher": (teacher, dataset, "none"),
        f"KD, live teacher + {args.mix}": (teacher, dataset, args.mix),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, (source, data, mix) in rows.items():
            torch.manual_seed(0)
            student = build_model(student_config(cfg, settings.teacher, "batch"), 3)
            optimizer = torch.optim.Adam(student.parameters(), lr=0.002)
            loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, generator=g)
            start = time.perf_counter()
            distill_one_epoch(student, source, loader, task, optimizer, cfg, mix=mix)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain student (labels only)"])
    print(
        f"{args.teacher} teacher -> {args.student} student, {args.images} images at {args.image_size} px, "
        f"batch {args.batch_size}, {args.threads} torch threads, CPU ({platform.machine()}), "
        f"median of {args.repeats}\n"
    )
    print("| epoch | median s | images/s | x plain |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {args.images / median:.1f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
