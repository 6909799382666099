"""Benchmark of the model zoo: size, forward FLOPs and CPU throughput of every registered model.

For each model: parameters, forward MFLOPs for one image (2 FLOPs per multiply-add, see
``common.models.count_flops``), median training throughput (SGD steps on random images, batch
``--batch-size``) and median inference throughput (eval mode, ``torch.no_grad``), medians over
``--repeats`` timed runs after one warm-up step. Prints a markdown table with the settings and,
with ``--json``, one JSON object on the last line.

    .venv/bin/python benchmarks/models.py                       # all models, 224 px, 2 threads
    .venv/bin/python benchmarks/models.py --models tiny-cnn,mobilenetv2 --image-size 64 --json

The dual teacher trains at roughly 1 image/s at 224 px on 2 cores: the default step counts are
small so that the whole run stays under about 8 minutes. Numbers on a shared machine are noisy:
the output records the load average before and after, and the per-run figures in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

from common.config import ModelConfig
from common.models import build_model, count_flops, count_parameters, get_spec, list_models

NUM_OUTPUTS = 3


@dataclass(frozen=True)
class Result:
    model: str
    role: str
    parameters: int
    mflops: float
    train_images_per_s: float
    infer_images_per_s: float
    train_runs: list[float]
    infer_runs: list[float]


def _train_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int
) -> float:
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return steps * x.shape[0] / (time.perf_counter() - start)


def _infer_steps(model: nn.Module, x: torch.Tensor, steps: int) -> float:
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return steps * x.shape[0] / (time.perf_counter() - start)


def bench_model(name: str, args: argparse.Namespace) -> Result:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, norm=args.norm, in_channels=args.in_channels), NUM_OUTPUTS)
    x = torch.randn(args.batch_size, args.in_channels, args.image_size, args.image_size)
    y = torch.randint(0, NUM_OUTPUTS, (args.batch_size,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mflops = count_flops(model, args.image_size, args.in_channels) / 1e6
    _train_steps(model, optimizer, x, y, 1)  # warm-up: allocator, oneDNN kernels
    _infer_steps(model, x, 1)
    train = [_train_steps(model, optimizer, x, y, args.train_steps) for _ in range(args.repeats)]
    infer = [_infer_steps(model, x, args.infer_steps) for _ in range(args.repeats)]
    return Result(
        model=name,
        role=get_spec(name).role,
        parameters=count_parameters(model),
        mflops=round(mflops, 1),
        train_images_per_s=round(statistics.median(train), 2),
        infer_images_per_s=round(statistics.median(infer), 2),
        train_runs=[round(v, 2) for v in train],
        infer_runs=[round(v, 2) for v in infer],
    )


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated subset (default: all registered)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--in-channels", type=int, default=1, choices=(1, 3))
    parser.add_argument("--norm", default="batch", choices=("batch", "group"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=2, help="training steps per timed run")
    parser.add_argument("--infer-steps", type=int, default=2, help="inference batches per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the table shows medians")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    args = parser.parse_args(argv)
    known = list_models()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()] or known
    unknown = [m for m in args.models if m not in known]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    for option in ("image_size", "batch_size", "train_steps", "infer_steps", "repeats", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=140)
    settings = {
        "image_size": args.image_size,
        "in_channels": args.in_channels,
        "norm": args.norm,
        "batch_size": args.batch_size,
        "train_steps": args.train_steps,
        "infer_steps": args.infer_steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "optimizer": "SGD momentum 0.9",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),
    }
    console.print(
        "settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + "; medians over repeats, "
        "1 warm-up step excluded; FLOPs = 2 x multiply-adds (convs, linears) for one image"
    )
    results: list[Result] = []
    started = time.perf_counter()
    for name in args.models:
        console.print(f"benchmarking {name} ...")
        results.append(bench_model(name, args))
    table = Table(box=box.MARKDOWN, title=f"Model zoo at {args.image_size} px")
    for column in ("model", "role", "parameters", "MFLOPs", "train img/s", "infer img/s"):
        table.add_column(column, justify="left" if column in ("model", "role") else "right")
    for r in results:
        table.add_row(
            r.model,
            r.role,
            f"{r.parameters:,}",
            f"{r.mflops:,.1f}",
            f"{r.train_images_per_s:.2f}",
            f"{r.infer_images_per_s:.2f}",
        )
    console.print(table)
    students = [r for r in results if r.role == "student"]
    for student in students:
        for teacher in (r for r in results if r.role == "teacher"):
            console.print(
                f"{student.model} vs {teacher.model}: "
                f"{100 * student.parameters / teacher.parameters:.1f}% of the parameters, "
                f"{teacher.mflops / student.mflops:.1f}x fewer FLOPs, "
                f"{student.infer_images_per_s / teacher.infer_images_per_s:.2f}x inference throughput"
            )
    settings["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    console.print(
        f"total time {time.perf_counter() - started:.0f} s; 1-min load average "
        f"{settings['load_average_1min_before']} before, {settings['load_average_1min_after']} after "
        "(above cpu_count means contended, noisy numbers)"
    )
    if args.json:
        print(json.dumps({"settings": settings, "results": [asdict(r) for r in results]}))


if __name__ == "__main__":
    main()
