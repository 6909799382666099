"""Why KD can hurt at a label-skewed site: the global teacher's calibration at each site.

For every site of a finished experiment folder (``python -m simulation`` or ``run --out``), score
the distilled-from teacher (``run/checkpoints/best.pt``) on the site's test split, as received
and after re-estimating its BatchNorm running statistics on the site's own train split
(``common.distillation.recalibrate_batchnorm``), and print a markdown table: accuracy, balanced
accuracy, macro-AUROC, and the predicted vs true class rates.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/kd_calibration.py runs/demo-YYYYMMDD-HHMMSS
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.checkpoint import load_model_state
from common.distillation import recalibrate_batchnorm
from common.local import EVAL_BATCH_SIZE, DataRequest, build_loaded_model, load_site_data
from common.run_settings import run_settings_from_config
from common.training import evaluate


def rates(values: np.ndarray, num_classes: int) -> str:
    counts = np.bincount(values, minlength=num_classes)
    return "/".join(f"{c / max(1, len(values)):.2f}" for c in counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="experiment folder (holds run/ and partition/)")
    parser.add_argument("--which", default="best", help="teacher checkpoint: best or last")
    args = parser.parse_args()
    out = args.experiment.resolve()
    run_config = json.loads((out / "experiment.json").read_text())["resolved_run_config"]
    settings = run_settings_from_config(run_config)
    task = settings.task
    state = load_model_state(out / "run" / "checkpoints" / f"{args.which}.pt")
    torch.set_num_threads(1)
    print(f"teacher {settings.teacher.name} ({settings.teacher.norm} norm), {args.which}.pt, test split")
    print("classes: " + "/".join(task.classes))
    print()
    print(
        "| site | teacher BN stats | accuracy | balanced acc. | macro-AUROC | predicted rates | true rates |"
    )
    print("|---|---|---:|---:|---:|---|---|")
    for manifest in sorted((out / "partition").glob("site_*.csv")):
        request = DataRequest(
            data_format="manifest",
            data_path=manifest,
            task=task,
            image_size=settings.run.image_size,
            cache_dir=Path(run_config["cache-dir"]),
            val_fraction=settings.run.val_fraction,
            test_fraction=settings.run.test_fraction,
            split_seed=settings.run.split_seed,
        )
        data = load_site_data(request)
        test = DataLoader(data.dataset("test"), batch_size=EVAL_BATCH_SIZE)
        teacher = build_loaded_model(settings.teacher, task, state)
        for label in ("federated (as received)", "re-estimated on site train"):
            if label.startswith("re-"):
                recalibrate_batchnorm(teacher, DataLoader(data.dataset("train"), batch_size=EVAL_BATCH_SIZE))
            result = evaluate(teacher, test, task)
            m = result.metrics
            predicted = result.scores.argmax(axis=1)
            true = result.targets.argmax(axis=1)
            print(
                f"| {manifest.stem} | {label} | {m.accuracy:.3f} | {m.balanced_accuracy:.3f} | "
                f"{m.auroc_macro:.3f} | {rates(predicted, task.num_classes)} | "
                f"{rates(true, task.num_classes)} |"
            )


if __name__ == "__main__":
    main()
