"""Cost of the site evaluation's statistics: ``evaluate_scores`` with 1,000 bootstrap resamples.

Synthetic labels and scores (no model, no images): a 3-class task and the 14 NIH findings at
``--images`` images (default 3,000). Prints wall and CPU time (``time.process_time``; on a
machine shared with other jobs the CPU time is the steadier figure), medians over repeats.

Usage: ``.venv/bin/python benchmarks/evaluation.py [--images 3000] [--resamples 1000]
[--repeats 3] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from common.evaluation import EvaluationSettings, evaluate_scores
from common.tasks import get_task


def synthetic(task_name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    task = get_task(task_name)
    rng = np.random.default_rng(seed)
    c = task.num_classes
    if task.kind == "multiclass":
        truth = rng.integers(0, c, n)
        logits = rng.normal(size=(n, c))
        logits[np.arange(n), truth] += 1.5
        return np.eye(c)[truth], np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = (rng.random((n, c)) < 0.1).astype(float)
    return targets, np.clip(0.3 * targets + 0.7 * rng.random((n, c)), 0.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for task_name in ("normal-pneumonia-covid", "nih14"):
        task = get_task(task_name)
        targets, scores = synthetic(task_name, args.images)
        evaluate_scores(task, targets, scores, EvaluationSettings(n_bootstrap=10))  # imports, warm-up
        wall, cpu = [], []
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            evaluate_scores(task, targets, scores, EvaluationSettings(n_bootstrap=args.resamples, seed=0))
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        rows.append(
            {
                "task": task_name,
                "classes": task.num_classes,
                "images": args.images,
                "resamples": args.resamples,
                "wall_s": statistics.median(wall),
                "cpu_s": statistics.median(cpu),
            }
        )
    print(f"| task | classes | images | resamples | wall s | CPU s |  (median of {args.repeats})")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['task']} | {r['classes']} | {r['images']} | {r['resamples']} | "
            f"{r['wall_s']:.2f} | {r['cpu_s']:.2f} |"
        )
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
