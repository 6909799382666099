"""Label skew on the demo (issue 25): run the demo with other run settings, then tabulate.

``demo`` runs exactly what ``python -m simulation`` (no arguments) runs (synthetic images,
Dirichlet 1.0 over 3 sites, ResNet18 with BatchNorm, FedAvg, KD, baselines), with a seed (the
partition's and the training's) and ``--set KEY=VALUE`` run settings on top, e.g. the
``local-loss`` candidates::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/label_skew.py demo runs/bs_s0 --seed 0 \\
        --set local-loss=balanced-softmax

``table`` prints one markdown row per run folder and teacher from ``report/results.json``: the
federated and pooled teachers on the pooled test set (macro-AUROC, balanced accuracy,
sensitivity per class), the federated teacher at the sites (mean balanced accuracy as received
and after each site re-estimates its BatchNorm statistics), the delivered students, and, with
``--pooled-bn``, the federated teacher once more with its BatchNorm statistics re-estimated on the
union of the sites' training images (a diagnostic: what aggregating per-site statistics of the
final weights would give; no site does this today)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/label_skew.py table runs/ce_s0 runs/bs_s0 --pooled-bn
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.run_settings import load_schema, resolve_run_config

CLASSES = ("normal", "pneumonia", "covid-19")


def run_demo(out: Path, seed: int, sets: list[str]) -> None:
    from simulation import cli
    from simulation.experiment import ExperimentConfig, PartitionSpec, SourceSpec

    run_config = {**cli.DEMO_RUN_CONFIG, "seed": seed, **resolve_run_config(load_schema(), None, sets)}
    config = ExperimentConfig(
        out=out,
        sources=(SourceSpec("synthetic", None, cli.DEMO_SYNTHETIC_OPTIONS),),
        partition=PartitionSpec(name="dirichlet", sites=3, alpha=1.0, seed=seed),
        run_config=run_config,
        baselines=True,
    )
    started = time.perf_counter()
    report = cli.run_experiment_with_progress(config)
    print(f"wall seconds: {time.perf_counter() - started:.1f}")
    print(f"report: {report}")


def _row(name: str, label: str, scores: dict[str, Any], extra: str = "") -> str:
    sens = " / ".join(f"{scores.get(f'sensitivity/{c}') or 0.0:.3f}" for c in CLASSES)
    auroc, balanced = scores["auroc_macro"], scores["balanced_accuracy"]
    return f"| {name} | {label} | {auroc:.3f} | {balanced:.3f} | {sens} | {extra} |"


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else float("nan")


def pooled_bn_scores(out: Path) -> dict[str, Any]:
    from common.checkpoint import load_model_state
    from common.distillation import recalibrate_batchnorm
    from common.local import build_loaded_model
    from common.run_settings import run_settings_from_config
    from simulation.baselines import _score, load_sites

    settings = run_settings_from_config(json.loads((out / "run" / "run_config.json").read_text()))
    sites = load_sites(
        out, settings, len(json.loads((out / "partition" / "partition.json").read_text())["sizes"])
    )
    model = build_loaded_model(
        settings.teacher, settings.task, load_model_state(out / "run" / "checkpoints" / "best.pt")
    )
    train = ConcatDataset([s.dataset("train") for s in sites.values()])
    recalibrate_batchnorm(model, DataLoader(train, batch_size=128))
    model.eval()
    return _score(model, ConcatDataset([s.dataset("test") for s in sites.values()]), settings)


def table(outs: list[Path], pooled_bn: bool) -> None:
    print(
        "| run | teacher | pooled-test macro-AUROC | balanced accuracy | sensitivity normal / pneumonia / "
        "covid-19 | at the sites, mean bal. acc. as received / after site BN; "
        "delivered students AUROC / bal. acc. |"
    )
    print("|---|---|---|---|---|---|")
    for out in outs:
        results = json.loads((out / "report" / "results.json").read_text())
        rows = [d for d in results["distillation"] if d.get("phase") == "distill"]
        delivered = [d for d in results.get("delivered") or [] if isinstance(d, dict)]
        received, site_bn = (
            _mean(rows, "teacher_balanced_accuracy"),
            _mean(rows, "teacher_site_bn_balanced_accuracy"),
        )
        s_auroc, s_bal = (
            _mean(delivered, "student_auroc_macro"),
            _mean(delivered, "student_balanced_accuracy"),
        )
        extra = f"{received:.3f} / {site_bn:.3f}; {s_auroc:.3f} / {s_bal:.3f}"
        print(_row(out.name, "federated", results["baselines"]["federated"]["pooled_test"], extra))
        if pooled_bn:
            print(_row(out.name, "federated, BN re-estimated on all sites' train", pooled_bn_scores(out)))
        print(_row(out.name, "pooled", results["baselines"]["pooled"]["pooled_test"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the demo with a seed and run settings")
    demo.add_argument("out", type=Path)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    tab = commands.add_parser("table", help="markdown table of finished runs")
    tab.add_argument("outs", type=Path, nargs="+")
    tab.add_argument("--pooled-bn", action="store_true")
    args = parser.parse_args()
    if args.command == "demo":
        run_demo(args.out, args.seed, args.sets)
    else:
        torch.set_num_threads(1)
        table(args.outs, args.pooled_bn)


if __name__ == "__main__":
    main()
