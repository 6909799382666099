"""Training steps under three OpenMP wait policies, alone and beside other busy processes.

Each scenario starts ``processes`` copies of one worker at once: a teacher training loop
(``common.models.build_model``, SGD with momentum, random 1-channel images) with ``threads``
torch threads, timed per step; ``busy`` adds that many single-thread pure-Python loops beside them
(a stand-in for a SuperLink, gateway or SuperNode wanting a core). Policies: libgomp's
``default`` (nothing set: a waiting thread spins 300,000 times, then sleeps), ``spin-1000``
(``GOMP_SPINCOUNT=1000``: what cxr-fl sets, common/openmp.py) and ``passive``
(``OMP_WAIT_POLICY=PASSIVE``: no spinning). Prints a markdown table: median seconds per step of
the slowest worker (steps after the first two), median over ``--repeats`` runs.

    .venv/bin/python benchmarks/openmp_wait.py [--teacher resnet18] [--image-size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, statistics, sys, time
import torch
from common.config import ModelConfig
from common.models import build_model
teacher = sys.argv[1]
size, batch, steps, threads = (int(a) for a in sys.argv[2:6])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = build_model(ModelConfig(name=teacher), 3)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.rand(batch, 1, size, size), torch.randint(0, 3, (batch,))
times = []
for _ in range(steps):
    start = time.perf_counter()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    times.append(time.perf_counter() - start)
print(json.dumps(statistics.median(times[2:])))
"""

BUSY = "while True: pass"

POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "spin-1000": {"GOMP_SPINCOUNT": "1000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}

# (training processes, torch threads each, busy single-thread loops beside them)
SCENARIOS = ((1, 2, 0), (1, 2, 1), (2, 2, 0), (2, 1, 0))


def run_scenario(policy: str, processes: int, threads: int, busy: int, args: argparse.Namespace) -> float:
    """Median step seconds of the slowest of ``processes`` workers started together."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-c", WORKER, args.teacher, str(args.image_size), str(args.batch_size)]
    command += [str(args.steps), str(threads)]
    started: list[subprocess.Popen[str]] = []
    try:
        loops = [subprocess.Popen([sys.executable, "-c", BUSY], env=env, text=True) for _ in range(busy)]
        started += loops
        workers = [
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)
        ]
        started += workers
        results = []
        for worker in workers:
            out, _ = worker.communicate()
            if worker.returncode != 0:
                raise SystemExit(f"a training worker failed (exit code {worker.returncode})")
            results.append(float(json.loads(out)))
        return max(results)
    finally:
        for process in started:  # the busy loops, and any worker left on an error or Ctrl-C: by PID
            if process.poll() is None:
                process.kill()
                process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for processes, threads, busy in SCENARIOS:
        seconds: dict[str, list[float]] = {policy: [] for policy in POLICIES}
        for _ in range(args.repeats):  # the policies alternate, so drift hits them all
            for policy in POLICIES:
                seconds[policy].append(run_scenario(policy, processes, threads, busy, args))
        step_s = {policy: statistics.median(v) for policy, v in seconds.items()}
        rows.append({"processes": processes, "threads": threads, "busy": busy, "step_s": step_s})
    if args.json:
        print(json.dumps({"settings": vars(args), "cores": os.cpu_count(), "results": rows}, indent=2))
        return
    print(
        f"{args.teacher}, {args.image_size} px, batch {args.batch_size}, median of steps 3-{args.steps} "
        f"of the slowest worker, median of {args.repeats} runs; {os.cpu_count()} cores, "
        f"{platform.processor() or 'CPU'}\n"
    )
    print(
        "| training processes x threads | busy loops beside | "
        + " | ".join(f"{p} s/step" for p in POLICIES)
        + " |"
    )
    print("|---|---:|" + "---:|" * len(POLICIES))
    for r in rows:
        cells = " | ".join(f"{r['step_s'][p]:.3f}" for p in POLICIES)
        print(f"| {r['processes']} x {r['threads']} | {r['busy']} | {cells} |")


if __name__ == "__main__":
    main()
