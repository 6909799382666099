"""The three public sets in ../shared/data read through their adapters (counts from its README)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from common.data.cache import build_cache
from common.data.sources import load_catalog
from common.data.splits import split_by_patient
from common.tasks import get_task

pytestmark = pytest.mark.realdata


def test_kermany_counts_and_patients(shared_data: Path, tmp_path: Path) -> None:
    cat = load_catalog("image-folder", shared_data / "kermany-pneumonia", get_task("normal-pneumonia"))
    assert len(cat) == 5216
    assert cat.class_counts() == {"normal": 1341, "pneumonia": 3875}
    subtypes = Counter(r.meta.get("subtype") for r in cat.records)
    assert (subtypes["bacteria"], subtypes["virus"]) == (2530, 1345)
    assert all(r.patient_id is not None for r in cat.records)
    split = split_by_patient(cat, val_fraction=0.1, test_fraction=0.2, seed=0)
    train_patients = {cat.records[i].patient_id for i in split.train}
    assert not train_patients & {cat.records[i].patient_id for i in split.test}
    sample = cat.subset(np.random.default_rng(0).choice(len(cat), 60, replace=False))
    cached = build_cache(sample, 64, tmp_path / "cache")
    assert cached.images.shape == (60, 64, 64)
    assert not cached.skipped


def test_covid19_radiography_counts_and_sources(shared_data: Path, tmp_path: Path) -> None:
    cat = load_catalog("covid19-radiography", shared_data / "covid19-radiography", get_task("normal-covid"))
    assert len(cat) == 6847
    assert cat.class_counts() == {"normal": 3500, "covid-19": 3347}
    sites = Counter(r.site for r in cat.records)
    assert sites["https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data"] == 3500
    assert sites["https://bimcv.cipf.es/bimcv-projects/bimcv-covid19/"] == 2573
    assert sites["https://github.com/armiro/COVID-CXNet"] == 774
    sample = cat.subset(np.arange(0, len(cat), 120))
    assert not build_cache(sample, 32, tmp_path / "cache").skipped


def test_nih14_rows_and_findings(shared_data: Path, tmp_path: Path) -> None:
    task = get_task("nih14")
    cat = load_catalog("nih14", shared_data / "nih-chestxray14", task)
    assert len(cat) == 1000
    # Positives per finding recomputed from the official label file itself.
    csv_path = shared_data / "nih-chestxray14" / "Data_Entry_2017_v2020.csv"
    rows = csv_path.read_text().splitlines()[1:]
    expected = Counter(f for row in rows for f in row.split(",")[1].split("|") if f != "No Finding")
    assert cat.class_counts() == {f: expected.get(f, 0) for f in task.classes}
    no_finding = sum(row.split(",")[1] == "No Finding" for row in rows)
    assert int((cat.primary_labels() == task.num_classes).sum()) == no_finding
    cached = build_cache(cat.subset(np.arange(50)), 64, tmp_path / "cache")
    assert cached.images.shape == (50, 64, 64)
