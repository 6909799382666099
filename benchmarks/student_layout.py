"""Training speed of the MobileNetV2 student by memory layout and batch size.

The student trains with the project's loop (``common.distillation.distill_one_epoch``, KD from
cached teacher logits, as at the coordinator and the sites) on random greyscale images, once in
PyTorch's default NCHW layout and once channels-last (``common.models.to_training_layout``, what
``distill_student`` now does on the CPU), at each batch size. Prints a markdown table of median
images per second over ``--repeats`` epochs and the channels-last speed-up.

    .venv/bin/python benchmarks/student_layout.py --images 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import DistillConfig, ModelConfig
from common.distillation import IndexedDataset, distill_one_epoch
from common.local import student_config
from common.models import build_model, to_training_layout
from common.tasks import get_task


def images_per_second(args: argparse.Namespace, batch_size: int, channels_last: bool) -> list[float]:
    """Images per second of ``args.repeats`` timed epochs (after one untimed warm-up epoch)."""
    task = get_task("normal-pneumonia-covid")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((args.images, 1, args.image_size, args.image_size), generator=generator)
    targets = torch.nn.functional.one_hot(torch.arange(args.images) % 3, 3).float()
    logits = torch.randn((args.images, 3), generator=generator)
    distill = DistillConfig(width_mult=args.width_mult, alpha=1.0, temperature=2.0, batch_size=batch_size)
    torch.manual_seed(0)
    student = build_model(student_config(distill, ModelConfig(name="resnet18"), "batch"), 3)
    if channels_last:
        to_training_layout(student, "cpu")
    optimizer = torch.optim.Adam(student.parameters(), lr=0.002)
    data = IndexedDataset(TensorDataset(images, targets))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    rates = []
    for epoch in range(args.repeats + 1):
        start = time.perf_counter()
        distill_one_epoch(student, logits, loader, task, optimizer, distill)
        if epoch:
            rates.append(args.images / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--width-mult", type=float, default=0.5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"MobileNetV2 width {args.width_mult}, {args.image_size} px greyscale, {args.images} images an "
        f"epoch, {args.threads} threads, median of {args.repeats} epochs; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.2f}\n"
    )
    print("| batch | NCHW images/s | channels-last images/s | speed-up |")
    print("|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        plain = statistics.median(images_per_second(args, batch_size, channels_last=False))
        fast = statistics.median(images_per_second(args, batch_size, channels_last=True))
        print(f"| {batch_size} | {plain:.0f} | {fast:.0f} | {fast / plain:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
