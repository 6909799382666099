"""How a simulated federation scales with the number of sites at a fixed total amount of data.

For 2, 5, 10 and 20 sites (IID split of the same synthetic images): wall time per teacher round
(median over rounds after the first), time to the end of the run, and the peak memory of all the
run's processes together (SuperLink, simulation process, Ray and its site workers: the sum of
their resident set sizes, sampled every 0.5 s from /proc).

    .venv/bin/python benchmarks/simulation_scale.py [--sites 2 5 10 20 50 100] [--images 1200] [--json]

Each measured row is printed to stderr as soon as it is done (a long series on a busy machine
keeps what it measured if a later size fails).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.data.sources import load_catalog  # noqa: E402
from common.run_settings import check_run_config  # noqa: E402
from common.tasks import get_task  # noqa: E402
from simulation.partition import partition_catalog, write_partition  # noqa: E402
from simulation.runtime import FlowerSimulation  # noqa: E402

PAGE = 4096


def rss_of_processes_with(marker: bytes) -> int:
    """Total resident memory (bytes) of live processes whose environment contains ``marker``."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "environ").read_bytes():
                continue
            total += int((entry / "statm").read_text().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


class PeakMemory:
    """Samples :func:`rss_of_processes_with` in a thread; ``peak`` is the largest sample."""

    def __init__(self, marker: str, interval: float = 0.5) -> None:
        self.marker = marker.encode()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_of_processes_with(self.marker))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(num_sites: int, args: argparse.Namespace, work: Path) -> dict[str, float]:
    task = get_task("normal-pneumonia-covid")
    catalog = load_catalog(
        "synthetic", None, task, options={"n_images": args.images, "image_size": args.image_size, "seed": 1}
    )
    partition = partition_catalog(catalog, "iid", num_sites, seed=0, min_site_size=3)
    manifests = write_partition(
        work / f"partition-{num_sites}", catalog, partition, source_paths={"synthetic": None}
    )
    run_dir = work / f"run-{num_sites}"
    config = check_run_config(
        {
            "run-dir": str(run_dir),
            "cache-dir": str(work / f"cache-{num_sites}"),
            "simulation-manifest-dir": str(manifests),
            "teacher-name": args.teacher,
            "image-size": args.image_size,
            "num-rounds": args.rounds,
            "batch-size": 16,
            "kd-enabled": False,
            "min-train-sites": num_sites,
            "min-evaluate-sites": num_sites,
            "min-available-sites": num_sites,
        }
    )
    flower_dir = work / f"flower-{num_sites}"
    started = time.monotonic()
    with FlowerSimulation(flower_dir) as simulation, PeakMemory(str(flower_dir / "flwr-home")) as memory:
        simulation.run(config, num_sites=num_sites)
    total = time.monotonic() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [float(r["seconds"]) for r in rows if r["phase"] == "aggregate"]
    return {
        "sites": num_sites,
        "images_per_site": args.images / num_sites,
        "round1_s": seconds[0],
        "round_s": statistics.median(seconds[1:] or seconds),
        "run_s": total,
        "peak_rss_gb": memory.peak / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 5, 10, 20, 50, 100])
    parser.add_argument("--images", type=int, default=1200, help="total images, split over the sites")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--teacher", default="tiny-cnn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="cxr-fl-scale-") as tmp:
        for num_sites in args.sites:
            results.append(measure(num_sites, args, Path(tmp)))
            print(f"measured {num_sites} sites: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    print(
        f"\nSimulated federation, {args.images} synthetic images in all at {args.image_size} px, teacher "
        f"{args.teacher}, {args.rounds} rounds, 1 local epoch, batch 16, 1 CPU per site (Ray), "
        f"2-core machine; round time = median of rounds 2..{args.rounds}\n"
    )
    print("| sites | images/site | round 1 s | round s | whole run s | peak memory GB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['sites']} | {r['images_per_site']:.0f} | {r['round1_s']:.1f} | {r['round_s']:.2f} | "
            f"{r['run_s']:.1f} | {r['peak_rss_gb']:.2f} |"
        )
    if args.json:
        print(json.dumps({"settings": vars(args), "results": results}))


if __name__ == "__main__":
    main()
