"""Cost of one federated teacher round: 2 sites on loopback in Flower's simulation runtime.

For each teacher: wall time per round (median over the rounds after the first, which also pays
for starting Ray and importing torch in the site actors), the part of it spent in local training
(the slower site's ``train_seconds``, since sites train in parallel), the rest (overhead:
messaging, aggregation, validation, checkpointing), and the bytes a site receives and sends per
round (the teacher's state_dict, float32, each way; Flower's simulation runtime keeps no
traffic counter). The deployment path (SuperLink + SuperNodes over TLS) is measured by
benchmarks/fl_round_deploy.py.

    .venv/bin/python benchmarks/fl_round.py [--teachers tiny-cnn resnet18 ...] [--rounds 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import ModelConfig  # noqa: E402
from common.data.sources import load_catalog  # noqa: E402
from common.models import build_model  # noqa: E402
from common.run_settings import check_run_config  # noqa: E402
from common.tasks import get_task  # noqa: E402
from simulation.partition import partition_catalog, write_partition  # noqa: E402
from simulation.runtime import FlowerSimulation  # noqa: E402

DEFAULT_TEACHERS = ("tiny-cnn", "resnet18", "densenet121", "resnet50v2-vgg19")


def state_bytes(teacher: str, num_classes: int) -> int:
    model = build_model(ModelConfig(name=teacher), num_classes)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def measure(teacher: str, args: argparse.Namespace, work: Path, manifests: Path) -> dict[str, float | str]:
    run_dir = work / f"run-{teacher}"
    config = check_run_config(
        {
            "run-dir": str(run_dir),
            "cache-dir": str(work / "cache"),
            "simulation-manifest-dir": str(manifests),
            "teacher-name": teacher,
            "image-size": args.image_size,
            "num-rounds": args.rounds,
            "batch-size": 16,
            "kd-enabled": False,
            "val-fraction": 0.2,
            "test-fraction": 0.1,
        }
    )
    started = time.monotonic()
    with FlowerSimulation(work / f"flower-{teacher}") as simulation:
        simulation.run(config, num_sites=2)
    total = time.monotonic() - started
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = sorted({int(r["round"]) for r in rows if r["phase"] == "aggregate"})
    wall = {r["round"]: float(r["seconds"]) for r in rows if r["phase"] == "aggregate"}
    training = {
        n: max(float(r["train_seconds"]) for r in rows if r["phase"] == "train" and r["round"] == n)
        for n in rounds
    }
    steady = rounds[1:] or rounds
    wall_median = statistics.median(wall[n] for n in steady)
    train_median = statistics.median(training[n] for n in steady)
    model_bytes = state_bytes(teacher, get_task("normal-pneumonia-covid").num_classes)
    return {
        "teacher": teacher,
        "parameters_mb": model_bytes / 1e6,
        "round1_s": wall[rounds[0]],
        "round_s": wall_median,
        "training_s": train_median,
        "overhead_s": wall_median - train_median,
        "bytes_down_per_site": model_bytes,
        "bytes_up_per_site": model_bytes,
        "run_total_s": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", default=list(DEFAULT_TEACHERS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images-per-site", type=int, default=60)
    parser.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="cxr-fl-bench-") as tmp:
        work = Path(tmp)
        task = get_task("normal-pneumonia-covid")
        catalog = load_catalog(
            "synthetic",
            None,
            task,
            options={"n_images": 2 * args.images_per_site, "image_size": args.image_size},
        )
        partition = partition_catalog(catalog, "iid", 2, seed=0)
        manifests = write_partition(work / "partition", catalog, partition, source_paths={"synthetic": None})
        for teacher in args.teachers:
            results.append(measure(teacher, args, work, manifests))
            print(f"measured {teacher}", file=sys.stderr, flush=True)

    print(
        f"\nFederated teacher round, 2 sites in Flower's simulation runtime (Ray, 1 CPU per site), loopback; "
        f"{args.images_per_site} synthetic images per site at {args.image_size} px, batch 16, 1 local epoch; "
        f"medians over rounds 2..{args.rounds} (round 1 shown apart: it starts Ray and the site actors)\n"
    )
    print(
        "| teacher | state MB | round 1 s | round s | local training s | overhead s "
        "| bytes down/site/round | bytes up/site/round |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['teacher']} | {r['parameters_mb']:.1f} | {r['round1_s']:.1f} | {r['round_s']:.2f} | "
            f"{r['training_s']:.2f} | {r['overhead_s']:.2f} | {int(r['bytes_down_per_site']):,} | "
            f"{int(r['bytes_up_per_site']):,} |"
        )
    if args.json:
        print(json.dumps({"settings": vars(args), "results": results}))


if __name__ == "__main__":
    main()
