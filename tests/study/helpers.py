"""Helpers of the study tests: tiny synthetic image pools, study configs and result records."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("normal", "pneumonia", "covid-19")


def write_manifest(folder: Path, patients: Iterable[tuple[str, str, str]], per_patient: int = 2) -> Path:
    """``folder/all.csv`` of small images whose brightness follows the label, ``per_patient``
    images for each ``(site, patient_id, label)``."""
    rng = np.random.default_rng(0)
    rows = []
    for site, patient_id, label in patients:
        for k in range(per_patient):
            mean = 60 + 60 * CLASSES.index(label)
            pixels = np.clip(rng.normal(mean, 25, size=(24, 24)), 0, 255).astype(np.uint8)
            path = folder / "images" / f"{patient_id}_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(path)
            rows.append([str(path), label, site, patient_id, ""])
    manifest = folder / "all.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "site", "patient_id", "view"])
        writer.writerows(rows)
    return manifest


def write_pool(folder: Path, n_patients: int = 60, per_patient: int = 2) -> Path:
    """A pool of two hospitals whose patients cycle through the three classes."""
    patients = [(f"hospital-{p % 2}", f"p{p:03d}", CLASSES[p % 3]) for p in range(n_patients)]
    return write_manifest(folder, patients, per_patient)


def write_config(
    tmp_path: Path,
    manifest: Path,
    extra: str = "",
    run: str = "",
    *,
    test_images: int = 30,
    pool_images: int = 80,
    epsilons: str = "[8.0, 3.0]",
    tail: str = "",
) -> Path:
    """A study config of two seeds over ``manifest`` (a tiny teacher at 32 px); ``extra`` goes to
    the top level (default: one federated-student round), ``run`` to [run], ``tail`` at the end."""
    config = tmp_path / "study.toml"
    config.write_text(
        f"""
out = "out"
results = "results"
sites = 2
nih-sites = 2
min-site-size = 10
seeds = [0, 1]
{extra or "federated-student-rounds = 1"}

[data.cxr]
task = "normal-pneumonia-covid"
test-images = {test_images}
pool-images = {pool_images}

[[data.cxr.sources]]
format = "manifest"
path = "{manifest}"

[data.nih]
task = "nih14"
test-images = 10
pool-images = 20

[[data.nih.sources]]
format = "nih14"
path = "no-such-folder"

[run]
teacher-name = "tiny-cnn"
image-size = 32
num-rounds = 2
batch-size = 16
lr = 0.05
kd-epochs = 1
kd-width-mult = 0.35
{run}

[privacy]
epsilons = {epsilons}
headline-epsilon = 8.0
{tail}
""",
        encoding="utf-8",
    )
    return config


def fake_result(cell: str, federated: float, **extra: object) -> dict[str, object]:
    """A finished cell's result record with the federated teacher's AUROC and what ``extra`` adds."""
    teachers: dict[str, object] = {"federated": {"auroc_macro": federated, "balanced_accuracy": 0.5}}
    record: dict[str, object] = {
        "cell": {"name": cell},
        "partition": {"sizes": [10, 10], "label_counts": {}, "label_skew_tv": 0.3, "natural_ids": None},
        "site_train_images": {"site_00": 8, "site_01": 8},
        "dp_epsilon_spent": {},
        "teachers": teachers,
    }
    if "pooled" in extra:
        teachers["pooled"] = {"auroc_macro": extra.pop("pooled")}
    if "local" in extra:
        teachers["local"] = {f"site_0{i}": {"auroc_macro": v} for i, v in enumerate(extra.pop("local"))}  # type: ignore[arg-type]
    if "students" in extra:
        kd, no_kd = extra.pop("students")  # type: ignore[misc]
        record["students"] = {
            site: {"kd": {"auroc_macro": kd}, "no_kd": {"auroc_macro": no_kd}}
            for site in ("site_00", "site_01")
        }
    record.update(extra)
    return record
