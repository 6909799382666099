"""Baselines train with the site's own loop on the site's own split recipe."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
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


def test_a_baseline_trains_with_every_core_the_process_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import simulation.baselines as baselines

    settings = run_settings_from_config(check_run_config({**TINY, "num-threads": 1}))
    site = _site(tmp_path, settings, seed=1)
    used: list[int] = []
    real_train_round = baselines.train_round

    def spy(*args: Any, **kwargs: Any) -> Any:
        used.append(args[4].num_threads)  # the TrainConfig
        return real_train_round(*args, **kwargs)

    monkeypatch.setattr(baselines, "train_round", spy)
    monkeypatch.setattr(baselines, "available_cores", lambda: 3)
    train_baseline(site, settings, seed=5)
    many = run_settings_from_config(check_run_config({**TINY, "num-threads": 4}))
    train_baseline(site, many, seed=5)

    assert used == [3, 4]  # never fewer than the run's own num-threads


def test_available_cores_counts_the_cores_this_process_may_run_on() -> None:
    from simulation.baselines import available_cores

    assert 1 <= available_cores() <= (os.cpu_count() or 1)


def test_a_baseline_starts_from_the_runs_pretrained_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import simulation.baselines as baselines
    from common.local import initial_teacher_state

    settings = run_settings_from_config(check_run_config(TINY))
    site = _site(tmp_path, settings, seed=1)
    pretrained = train_baseline(site, settings, seed=9)  # stands in for the coordinator's pretraining
    weights = tmp_path / "teacher.pt"
    torch.save(pretrained, weights)
    started: list[dict[str, torch.Tensor]] = []
    real_train_round = baselines.train_round

    def spy(*args: Any, **kwargs: Any) -> Any:
        started.append({k: v.clone() for k, v in args[3].items()})  # the initial state
        return real_train_round(*args, **kwargs)

    monkeypatch.setattr(baselines, "train_round", spy)
    from_file = run_settings_from_config(check_run_config({**TINY, "teacher-weights": str(weights)}))
    train_baseline(site, from_file, seed=5)
    train_baseline(site, settings, seed=5)

    assert all(torch.equal(started[0][k], pretrained[k]) for k in pretrained)
    random_start = initial_teacher_state(settings.teacher, settings.task, settings.train.seed)
    assert all(torch.equal(started[1][k], random_start[k]) for k in random_start)
    assert any(not torch.equal(started[0][k], started[1][k]) for k in pretrained)
