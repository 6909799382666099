"""Diagnose site distillation without Flower: a FedAvg teacher, then KD variants at every site.

Partitions the built-in synthetic images like the default demo (`python -m simulation`:
Dirichlet label skew, 3 sites), trains a FedAvg teacher in-process with the sites' own
``train_round`` (weights *and* BatchNorm running statistics averaged, as the server does),
then at every site scores the teacher as received and with BatchNorm statistics re-estimated
on the site's train split, and distils students under each named variant
(``--variant NAME:key=value,key=value`` over ``DistillConfig`` fields, repeatable).
Prints markdown tables: teacher calibration per site, then students per variant (test split).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/kd_sites.py --image-size 32 --kd-epochs 6
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.distillation import recalibrate_batchnorm
from common.local import (
    EVAL_BATCH_SIZE,
    DataRequest,
    build_loaded_model,
    derive_seed,
    distill_student,
    load_site_data,
    train_round,
)
from common.run_settings import (
    FederatedRunConfig,
    check_run_config,
    parse_set_option,
    run_settings_from_config,
)
from common.tasks import get_task
from common.training import evaluate

DEFAULT_VARIANTS = (
    "old:cache_teacher_logits=true,recalibrate_bn=false,schedule=constant,select_best=false",
    "site-bn:cache_teacher_logits=true,recalibrate_bn=true,schedule=constant,select_best=false",
    "new:",
)


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    out = {}
    for key in states[0]:
        mean = sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True))
        out[key] = mean.to(states[0][key].dtype)  # type: ignore[union-attr]
    return out


def rates(values: np.ndarray, num_classes: int) -> str:
    counts = np.bincount(values, minlength=num_classes)
    return "/".join(f"{c / max(1, len(values)):.2f}" for c in counts)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, pairs = text.partition(":")
    values = dict(parse_set_option(p) for p in pairs.split(",") if p)  # TOML values: true, 0.5, "x"
    return name, {k.replace("_", "-"): v for k, v in values.items()}


def load_settings(overrides: dict[str, Any]) -> FederatedRunConfig:
    """The settings of a run with ``overrides``, through the one loader (pyproject's defaults, every
    value and rule checked, as every entry point does)."""
    return run_settings_from_config(check_run_config(overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=900)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--kd-epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", action="append", help="NAME:key=value,... over DistillConfig")
    parser.add_argument("--nokd", action="store_true", help="also train each variant's no-KD student")
    args = parser.parse_args()
    task = get_task("normal-pneumonia-covid")
    work = Path(tempfile.mkdtemp(prefix="kd-sites-"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "simulation",
            "partition",
            "--out",
            str(work / "partition"),
            "--alpha",
            str(args.alpha),
            "--source-option",
            f"n-images={args.n_images}",
            "--source-option",
            f"image-size={args.image_size}",
        ],
        check=True,
        capture_output=True,
    )
    sites = []
    for manifest in sorted((work / "partition").glob("site_*.csv")):
        request = DataRequest("manifest", manifest, task, args.image_size, work / "cache", 0.15, 0.15, 0)
        sites.append((manifest.stem, load_site_data(request)))
    run = {
        "teacher-name": args.teacher,
        "teacher-norm": "batch",
        "teacher-in-channels": 1,
        "teacher-dropout": 0.2,
        "local-epochs": args.local_epochs,
        "optimizer": "adam",
        "lr": 0.001,
        "num-threads": args.threads,
        "kd-epochs": args.kd_epochs,
        "kd-optimizer": "adam",
        "kd-lr": 0.002,
        "kd-alpha": 0.9,
    }
    settings = load_settings(run)
    teacher_cfg, train = settings.teacher, settings.train
    torch.manual_seed(0)
    state = build_loaded_model(teacher_cfg, task, None).state_dict()
    started = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        outs = [
            train_round(data, task, teacher_cfg, state, train, seed=derive_seed(0, rnd, name))
            for name, data in sites
        ]
        state = fedavg([o.state_dict for o in outs], [len(d.split.train) for _, d in sites])
    print(
        f"FedAvg teacher: {args.rounds} rounds x {args.local_epochs} epochs, "
        f"{time.perf_counter() - started:.0f} s; {args.n_images} images at {args.image_size} px\n"
    )
    print(
        "| site | train n | teacher BN stats | accuracy | balanced acc. | macro-AUROC "
        "| predicted rates | true rates |"
    )
    print("|---|---:|---|---:|---:|---:|---|---|")
    for name, data in sites:
        teacher = build_loaded_model(teacher_cfg, task, state)
        test = DataLoader(data.dataset("test"), batch_size=EVAL_BATCH_SIZE)
        for label in ("federated", "site re-estimated"):
            if label != "federated":
                recalibrate_batchnorm(teacher, DataLoader(data.dataset("train"), batch_size=EVAL_BATCH_SIZE))
            r = evaluate(teacher, test, task)
            m = r.metrics
            print(
                f"| {name} | {len(data.split.train)} | {label} | {m.accuracy:.3f} | "
                f"{m.balanced_accuracy:.3f} | "
                f"{m.auroc_macro:.3f} | {rates(r.scores.argmax(1), 3)} | {rates(r.targets.argmax(1), 3)} |"
            )
    print()
    print(
        "| variant | site | student acc. | student bal. acc. | student AUROC | no-KD bal. acc. "
        "| no-KD AUROC | best epoch | seconds |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for text in args.variant or DEFAULT_VARIANTS:
        vname, overrides = parse_variant(text)
        distill = load_settings({**run, **{f"kd-{k}": v for k, v in overrides.items()}}).distill
        for name, data in sites:
            seed = derive_seed(0, "distill", name)
            out = distill_student(
                data,
                task,
                teacher_cfg,
                state,
                distill,
                norm="batch",
                seed=seed,
                num_threads=args.threads,
                evaluate_teacher=False,
            )
            m = out.metrics
            nokd = {"student_balanced_accuracy": float("nan"), "student_auroc_macro": float("nan")}
            if args.nokd:
                nokd = distill_student(
                    data,
                    task,
                    teacher_cfg,
                    state,
                    replace(distill),
                    norm="batch",
                    seed=seed,
                    num_threads=args.threads,
                    use_kd=False,
                    evaluate_teacher=False,
                ).metrics
            print(
                f"| {vname} | {name} | {m['student_accuracy']:.3f} | {m['student_balanced_accuracy']:.3f} | "
                f"{m['student_auroc_macro']:.3f} | {nokd['student_balanced_accuracy']:.3f} | "
                f"{nokd['student_auroc_macro']:.3f} | {m.get('student_best_epoch', float('nan')):.0f} | "
                f"{m['distill_seconds']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
