"""Baselines train with the site's own loop on the site's own split recipe."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from common.local import SiteData, load_site_data, site_data_request
from common.run_settings import FederatedRunConfig, check_run_config, run_settings_from_config
from simulation.baselines import PooledData, train_baseline

TINY = {"teacher-name": "tiny-cnn", "image-size": 32, "num-rounds": 1, "batch-size": 8, "lr": 0.05}


def _site(tmp_path: Path, settings: FederatedRunConfig, seed: int) -> SiteData:
    request = site_data_request(settings.run, settings.task, "synthetic", None, tmp_path / "cache")
    options = (("n-images", 24), ("seed", seed), ("image-size", 32))
    return load_site_data(replace(request, options=options))


def test_a_pool_of_one_site_trains_exactly_like_the_site(tmp_path: Path) -> None:
    settings = run_settings_from_config(check_run_config(TINY))
    site = _site(tmp_path, settings, seed=1)
    alone = train_baseline(site, settings, seed=5)
    pooled = train_baseline(PooledData([site]), settings, seed=5)
    assert alone.keys() == pooled.keys()
    assert all(torch.equal(alone[k], pooled[k]) for k in alone)
    other_seed = train_baseline(site, settings, seed=6)
    assert any(not torch.equal(alone[k], other_seed[k]) for k in alone if alone[k].is_floating_point())


def test_the_pool_is_the_union_of_the_sites_training_splits(tmp_path: Path) -> None:
    settings = run_settings_from_config(check_run_config(TINY))
    sites = [_site(tmp_path, settings, seed=s) for s in (1, 2)]
    pooled = PooledData(sites).dataset("train", augment=True, seed=3)
    assert len(pooled) == sum(len(s.dataset("train")) for s in sites)
    pooled.set_epoch(1)
    assert all(d.epoch == 1 for d in pooled.datasets)  # type: ignore[attr-defined]
