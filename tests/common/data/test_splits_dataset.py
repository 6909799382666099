"""Patient-grouped stratified splits and the cached, augmented Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.data.cache import build_cache
from common.data.catalog import Catalog, ImageRecord
from common.data.dataset import NORMALISATION, CxrDataset, normalise
from common.data.sources import load_catalog
from common.data.splits import split_by_patient
from common.errors import ConfigError, DataError
from common.tasks import get_task

NPC = get_task("normal-pneumonia-covid")


def _catalog(n_patients: int, seed: int = 0) -> Catalog:
    rng = np.random.default_rng(seed)
    records, labels = [], []
    for p in range(n_patients):
        cls = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
        for k in range(int(rng.integers(1, 6))):
            records.append(ImageRecord("s", f"{p}/{k}", (NPC.classes[cls],), patient_id=f"p{p}"))
            labels.append(cls)
    records.append(ImageRecord("s", "anon", ("normal",)))  # no patient id: its own group
    labels.append(0)
    targets = np.eye(3, dtype=np.float32)[labels]
    return Catalog(NPC, records, targets, {})


def test_split_groups_patients_and_stratifies() -> None:
    cat = _catalog(400)
    split = split_by_patient(cat, val_fraction=0.15, test_fraction=0.2, seed=7)
    parts = [split.train, split.val, split.test]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(cat)))
    patients = [{cat.records[i].patient_id for i in p} - {None} for p in parts]
    assert not (patients[0] & patients[1])
    assert not (patients[0] & patients[2])
    assert not (patients[1] & patients[2])
    n = len(cat)
    assert abs(len(split.test) / n - 0.2) < 0.02
    assert abs(len(split.val) / n - 0.15) < 0.02
    overall = np.bincount(cat.primary_labels(), minlength=3) / n
    for part in parts:
        share = np.bincount(cat.primary_labels()[part], minlength=3) / len(part)
        np.testing.assert_allclose(share, overall, atol=0.03)
    again = split_by_patient(cat, val_fraction=0.15, test_fraction=0.2, seed=7)
    np.testing.assert_array_equal(again.test, split.test)
    other = split_by_patient(cat, val_fraction=0.15, test_fraction=0.2, seed=8)
    assert not np.array_equal(other.test, split.test)


def test_split_errors() -> None:
    small = _catalog(1)  # one patient + one anonymous image: two groups for three parts
    with pytest.raises(DataError, match="too few images"):
        split_by_patient(small, val_fraction=0.3, test_fraction=0.3, seed=0)
    three = split_by_patient(_catalog(2), val_fraction=0.3, test_fraction=0.3, seed=0)
    assert min(len(three.train), len(three.val), len(three.test)) >= 1
    with pytest.raises(ConfigError, match="test-fraction"):
        split_by_patient(small, val_fraction=0.1, test_fraction=1.2, seed=0)
    with pytest.raises(ConfigError, match="sum below 1"):
        split_by_patient(small, val_fraction=0.5, test_fraction=0.5, seed=0)
    no_val = split_by_patient(_catalog(50), val_fraction=0.0, test_fraction=0.2, seed=0)
    assert len(no_val.val) == 0


@pytest.fixture
def synthetic_cache(tmp_path: Path):  # type: ignore[no-untyped-def]
    cat = load_catalog("synthetic", None, NPC, options={"n-images": 48, "image-size": 32, "seed": 1})
    return build_cache(cat, 32, tmp_path / "cache")


def test_dataset_items_and_normalisation(synthetic_cache) -> None:  # type: ignore[no-untyped-def]
    ds = CxrDataset(synthetic_cache, [3, 5], augment=False)
    x, y = ds[1]
    assert x.shape == (1, 32, 32)
    assert x.dtype == torch.float32
    expected = (torch.from_numpy(np.array(synthetic_cache.images[5])).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x[0], expected)
    torch.testing.assert_close(normalise(np.asarray(synthetic_cache.images[5])), expected)
    torch.testing.assert_close(y, torch.from_numpy(synthetic_cache.catalog.targets[5]))
    assert NORMALISATION == {"mean": 0.5, "std": 0.25}
    with pytest.raises(IndexError):
        CxrDataset(synthetic_cache, [48])


def test_augmentation_is_seeded_and_changes_with_epoch(synthetic_cache) -> None:  # type: ignore[no-untyped-def]
    a = CxrDataset(synthetic_cache, range(8), augment=True, seed=3)
    b = CxrDataset(synthetic_cache, range(8), augment=True, seed=3)
    plain = CxrDataset(synthetic_cache, range(8), augment=False)
    torch.testing.assert_close(a[2][0], b[2][0])
    assert not torch.equal(a[2][0], plain[2][0])
    first = a[2][0].clone()
    a.set_epoch(1)
    assert not torch.equal(a[2][0], first)
    assert a[2][0].min() >= (0 - 0.5) / 0.25 - 1e-6
    assert a[2][0].max() <= (1 - 0.5) / 0.25 + 1e-6


def test_dataloader_with_workers_matches_single_process(synthetic_cache) -> None:  # type: ignore[no-untyped-def]
    ds = CxrDataset(synthetic_cache, range(16), augment=True, seed=0)
    single = torch.cat([x for x, _ in DataLoader(ds, batch_size=8)])
    multi = torch.cat([x for x, _ in DataLoader(ds, batch_size=8, num_workers=2)])
    torch.testing.assert_close(single, multi)


def test_synthetic_set_is_learnable_by_a_small_cnn(tmp_path: Path) -> None:
    cat = load_catalog("synthetic", None, NPC, options={"n-images": 360, "image-size": 32, "seed": 0})
    cached = build_cache(cat, 32, tmp_path / "cache")
    split = split_by_patient(cached.catalog, val_fraction=0.0, test_fraction=0.25, seed=0)
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(128, 3),
    )  # fmt: skip
    train = CxrDataset(cached, split.train, augment=True, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(7):
        train.set_epoch(epoch)
        model.train()
        for x, y in DataLoader(
            train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(epoch)
        ):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y.argmax(1)).backward()
            opt.step()
    test = CxrDataset(cached, split.test)
    model.eval()
    with torch.no_grad():
        x, y = next(iter(DataLoader(test, batch_size=len(test))))
        accuracy = (model(x).argmax(1) == y.argmax(1)).float().mean().item()
    assert accuracy >= 0.8  # chance is about 0.33
