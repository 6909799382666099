"""Cost of one federated teacher round on the deployment path: SuperLink + 2 SuperNodes over TLS.

Runs the real commands on loopback (``cxr-fl-server start`` with TLS and site authentication,
two ``cxr-fl-client start`` on the ``synthetic`` source: 300 images per site) and reads the run
folder's metrics.jsonl: wall time per round (the aggregate row's ``seconds``: from sending the
round's messages to the aggregated model, validation of the previous model included), the
local-training part (the slower site's ``train_seconds``; sites train in
parallel), overhead = wall - training (messaging, a fresh ``flwr-clientapp`` process per message,
polling, validation, checkpointing), and bytes per site per round (the teacher's float32
state_dict, each way). Medians over rounds 2..N (round 1 also pays for first imports).
``cycle_s`` is the full round-to-round time (between two "Round N/M" lines of the server log,
so checkpoint and metrics writing are in it), ``cycle_overhead_s`` that minus local training.

Settings compared (all public Flower settings; no patches):
- ``default``: exactly what ``cxr-fl-server start`` / ``cxr-fl-client start`` do when given no
  option beyond TLS and site keys (no poll interval in the environment, SuperLink state in
  memory, models packed, the pyproject's run settings: ``validation-mode = "in-train"``, one
  message per site per round);
- ``two-messages``: the default with ``validation-mode = "separate"`` (train, then evaluate);
- ``flower-defaults``: SuperExec task poll 1 s (Flower's default), SuperLink state on disk
  (``--database``);
- ``fast-poll``: SuperExec task poll 0.2 s (what cxr-fl sets), state on disk (``--database``:
  registered sites survive a restart; the default before the state went to memory);
- ``fast-poll+memory``: as above with ``--in-memory`` SuperLink state (the default's).

``--cpu`` also samples ``/proc`` every 0.5 s for the CPU time of every process the federation
started (the SuperLink, the Fleet gateway, the ServerApp, each SuperNode, each site's
``cxr-fl-client`` with its warm runner, ...) and reports CPU seconds per round per component over
rounds 2..N (``cpu_per_round_s`` in the JSON): where a round's work goes when the machine is
CPU-bound.

The app side polls replies on a 50 ms..0.5 s backoff in every setting (flower_adapter/grid.py). With
in-train validation the last model is validated by one evaluate message after the last round:
``final_validation_s`` in the JSON (paid once per run, not per round).

    .venv/bin/python benchmarks/fl_round_deploy.py [--teachers tiny-cnn resnet18] [--rounds 3]
        [--settings default two-messages flower-defaults fast-poll fast-poll+memory] [--json] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import ModelConfig  # noqa: E402
from common.models import build_model  # noqa: E402
from common.processes import OFFLINE_ENV, free_port, stop_process_tree  # noqa: E402
from common.tasks import get_task  # noqa: E402

BIN = Path(sys.executable).parent
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({}, []),
    "two-messages": ({}, ["--set", 'validation-mode="separate"']),
    "flower-defaults": ({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}, ["--database"]),
    "fast-poll": ({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}, ["--database"]),
    "fast-poll+memory": ({"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}, ["--in-memory"]),
}
SITES = ("site-a", "site-b")
STARTUP_SECONDS = 300.0
"""How long the SuperLink may take to listen (minutes on a machine shared with other jobs)."""


def state_bytes(teacher: str) -> int:
    model = build_model(ModelConfig(name=teacher), get_task("normal-pneumonia-covid").num_classes)
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())


COMPONENTS = (
    ("flower_adapter.superlink_owner_only", "superlink"),
    ("flower-superlink", "superlink"),
    ("fleet_gateway", "gateway"),
    ("flwr-serverapp", "serverapp"),
    ("flower-supernode", "supernodes"),
    ("cxr-fl-client", "site runners (training included)"),
    ("cxr-fl-server", "cxr-fl-server"),
)


def _component(cmdline: str) -> str:
    for needle, name in COMPONENTS:
        if needle in cmdline:
            return name
    return "other"


class CpuSampler:
    """CPU seconds (user + system) of every descendant of this process, sampled from /proc.

    A process's time is read while it lives, so a process that ends between two samples loses
    at most one interval; the federation's processes live for the whole run.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu sampler", daemon=True)
        self._ticks = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.time(), self._descendants()))

    def _descendants(self) -> dict[int, tuple[str, float]]:
        stats: dict[int, tuple[int, float]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self._ticks)
        ours, frontier = set(), [os.getpid()]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in ours]
            ours.update(children)
            frontier += children
        found = {}
        for pid in ours:
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            found[pid] = (_component(cmdline), stats[pid][1])
        return found

    def per_component(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each component used between the wall-clock times ``start`` and ``end``."""

        def nearest(moment: float) -> dict[int, tuple[str, float]]:
            return min(self.samples, key=lambda sample: abs(sample[0] - moment))[1]

        before, after = nearest(start), nearest(end)
        used: dict[str, float] = {}
        for pid, (name, cpu) in after.items():
            used[name] = used.get(name, 0.0) + cpu - before.get(pid, (name, 0.0))[1]
        return dict(sorted(used.items(), key=lambda item: -item[1]))


def _run(args: list[str], env: dict[str, str]) -> None:
    subprocess.run(args, env=env, check=True, capture_output=True, timeout=120)


def federation(work: Path, teacher: str, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    env_extra, server_flags = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k != POLL_ENV}  # the product sets its own
    env.update({**OFFLINE_ENV, **env_extra})
    _run([str(BIN / "cxr-fl-server"), "certs", "--out", str(work / "certs"), "--host", "127.0.0.1"], env)
    for site in SITES:
        _run([str(BIN / "cxr-fl-server"), "site-key", "--out", str(work / "keys"), "--site", site], env)
    port = free_port()
    run_dir = work / "run"
    server_cmd = [
        str(BIN / "cxr-fl-server"),
        "start",
        "--run-dir",
        str(run_dir),
        "--certs",
        str(work / "certs"),
    ]
    server_cmd += ["--port", str(port), *server_flags]
    for key in ("num-rounds", "image-size"):
        server_cmd += ["--set", f"{key}={getattr(args, key.replace('-', '_'))}"]
    server_cmd += [
        "--set",
        f'teacher-name="{teacher}"',
        "--set",
        "kd-enabled=false",
        "--set",
        "batch-size=16",
    ]
    for site in SITES:
        server_cmd += ["--site-key", str(work / "keys" / f"{site}.pub")]
    processes: list[subprocess.Popen[bytes]] = []
    server_out = work / "server.out"
    sampler = CpuSampler() if args.cpu else None
    if sampler is not None:
        sampler.__enter__()
    try:
        with server_out.open("wb") as out:
            server = subprocess.Popen(server_cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        processes.append(server)
        deadline = time.monotonic() + STARTUP_SECONDS
        while "SuperLink listening" not in server_out.read_text(errors="replace"):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(server_out.read_text(errors="replace"))
            time.sleep(0.5)
        for site in SITES:
            with (work / f"{site}.out").open("wb") as out:
                client_cmd = [str(BIN / "cxr-fl-client"), "start", "--server", f"127.0.0.1:{port}"]
                client_cmd += ["--site", site, "--format", "synthetic", "--out", str(work / site)]
                client_cmd += [
                    "--ca",
                    str(work / "certs" / "ca.crt"),
                    "--key",
                    str(work / "keys" / f"{site}.key"),
                ]
                client_cmd += ["--threads", "1", "--skip-check"]
                processes.append(subprocess.Popen(client_cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
        if server.wait(timeout=args.timeout) != 0:
            raise RuntimeError(server_out.read_text(errors="replace")[-2000:])
    finally:
        if sampler is not None:
            sampler.__exit__()
        for process in processes:
            stop_process_tree(process)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = sorted({int(r["round"]) for r in rows if r["phase"] == "aggregate"})
    wall = {int(r["round"]): float(r["seconds"]) for r in rows if r["phase"] == "aggregate"}
    training = {
        n: max(float(r.get("train_seconds", 0.0)) for r in rows if r["phase"] == "train" and r["round"] == n)
        for n in rounds
    }
    steady = rounds[1:] or rounds
    final = float(
        next(r for r in rows if r["phase"] == "aggregate" and r["round"] == rounds[-1]).get(
            "final_validation_seconds", 0.0
        )
    )
    wall_median = statistics.median(wall[n] for n in steady)
    train_median = statistics.median(training[n] for n in steady)
    ends = round_ends(run_dir)
    cycles = [ends[n] - ends[n - 1] for n in steady if n in ends and n - 1 in ends]
    cycle = statistics.median(cycles) if cycles else float("nan")
    cpu: dict[str, float] = {}
    measured = len(rounds) > 1 and rounds[0] in ends and rounds[-1] in ends
    if sampler is not None and sampler.samples and measured:
        used = sampler.per_component(ends[rounds[0]], ends[rounds[-1]])
        cpu = {name: seconds / (len(rounds) - 1) for name, seconds in used.items()}
    return {
        "teacher": teacher,
        "setting": setting,
        "round1_s": wall[rounds[0]],
        "round_s": wall_median,
        "training_s": train_median,
        "overhead_s": wall_median - train_median,
        "cycle_s": cycle,
        "cycle_overhead_s": cycle - train_median,
        "final_validation_s": final,
        "bytes_per_site_each_way": float(state_bytes(teacher)),
        **({"cpu_per_round_s": cpu} if cpu else {}),
    }


def round_ends(run_dir: Path) -> dict[int, float]:
    """When each teacher round ended (its progress event, written after its checkpoint), in seconds."""
    from server.progress_events import run_steps
    from server.run_folder import RunFolder

    return {p.completed_round: p.time for p in run_steps(RunFolder(run_dir)) if p.phase == "teacher"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", default=["tiny-cnn", "resnet18"])
    parser.add_argument("--settings", nargs="+", default=["default", "two-messages"], choices=list(SETTINGS))
    parser.add_argument("--rounds", dest="num_rounds", type=int, default=3)
    parser.add_argument("--image-size", dest="image_size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    parser.add_argument(
        "--cpu", action="store_true", help="also report CPU seconds per round of each component (from /proc)"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep each federation's folder (run folder, logs) under this folder instead of a temporary one",
    )
    args = parser.parse_args()

    results = []
    for teacher in args.teachers:
        for setting in args.settings:
            if args.keep is not None:
                work = args.keep / f"{teacher}-{setting}"
                work.mkdir(parents=True, exist_ok=False)
                results.append(federation(work, teacher, setting, args))
            else:
                with tempfile.TemporaryDirectory(prefix="cxr-fl-deploy-bench-") as tmp:
                    results.append(federation(Path(tmp), teacher, setting, args))
            print(f"measured {teacher} / {setting}: {results[-1]['round_s']:.1f} s/round", file=sys.stderr)

    load = os.getloadavg()[0]
    print(
        f"\nFederated teacher round on the deployment path: SuperLink + 2 SuperNodes over TLS with site "
        f"authentication, loopback, {os.cpu_count()} cores (load average {load:.1f} at the end); "
        f"300 synthetic images per site at {args.image_size} px, batch 16, 1 local epoch; medians over "
        f"rounds 2..{args.num_rounds}\n"
    )
    print(
        "| teacher | setting | round 1 s | round s | local training s | overhead s | round-to-round s "
        "| final validation s (once) | bytes/site/round each way |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['teacher']} | {r['setting']} | {r['round1_s']:.1f} | {r['round_s']:.1f} | "
            f"{r['training_s']:.2f} | {r['overhead_s']:.1f} | {r['cycle_s']:.1f} | "
            f"{r['final_validation_s']:.1f} | "
            f"{int(r['bytes_per_site_each_way']):,} |"
        )
    for r in results:
        if "cpu_per_round_s" in r:
            parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in r["cpu_per_round_s"].items())
            print(f"\nCPU s per round, {r['teacher']} / {r['setting']}, rounds 2..{args.num_rounds}: {parts}")
    if args.json:
        print(json.dumps({"settings": vars(args), "results": results}, default=str))


if __name__ == "__main__":
    main()
