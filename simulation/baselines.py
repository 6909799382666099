"""Baselines of a simulated federation, evaluated on the same test images as the federated teacher.

- **federated**: the run's best global teacher (by federated validation);
- **pooled**: one teacher trained centrally on the union of every site's training split, for
  the same number of epochs a site trains in the whole run (rounds x local epochs), from the
  same initial weights and with the same optimiser settings;
- **local-only**: one teacher per site, trained on that site's training split alone, with the
  same budget.

Each site's split is recomputed with the exact code and seed the site used (common/local.py),
so the pooled test set is the union of the sites' test splits and no test image was trained on.
Every teacher is scored on the pooled test set and on each site's test split. (The student
without KD is trained at the sites during the distillation round, see ``kd-no-kd-baseline``.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from client.site import site_name_for_partition
from common.checkpoint import load_model_state
from common.device import CPU, Compute, resolve_compute
from common.jsonio import write_json
from common.local import (
    EVAL_BATCH_SIZE,
    SiteData,
    TrainingData,
    build_loaded_model,
    derive_seed,
    initial_teacher_state,
    load_site_data,
    scalar_metrics,
    site_data_request,
    train_round,
)
from common.run_settings import FederatedRunConfig
from common.training import evaluate

logger = logging.getLogger(__name__)


def site_names(num_sites: int) -> list[str]:
    return [site_name_for_partition(i) for i in range(num_sites)]


def load_sites(out: Path, settings: FederatedRunConfig, num_sites: int) -> dict[str, SiteData]:
    """Every site's data exactly as the site itself prepared it (same cache, same split seed)."""
    run = settings.run
    sites = {}
    for name in site_names(num_sites):
        request = site_data_request(
            run,
            settings.task,
            "manifest",
            Path(run.simulation_manifest_dir) / f"{name}.csv",
            Path(run.cache_dir) if run.cache_dir else out / "run" / "cache",
        )
        sites[name] = load_site_data(request)
    return sites


def _score(
    model: torch.nn.Module, dataset: Dataset[Any], settings: FederatedRunConfig, compute: Compute = CPU
) -> dict[str, float]:
    loader = DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, pin_memory=compute.pin_memory)
    result = evaluate(model, loader, settings.task, device=compute.device)
    return {"n": float(result.n), **scalar_metrics(result, "")}


def score_everywhere(
    state: dict[str, torch.Tensor], sites: dict[str, SiteData], settings: FederatedRunConfig
) -> dict[str, Any]:
    """A teacher's metrics on the pooled test set, the pooled validation set and each site's test split."""
    compute = resolve_compute(settings.compute)
    model = build_loaded_model(settings.teacher, settings.task, state).to(compute.device)
    pooled_test: Dataset[Any] = ConcatDataset([s.dataset("test") for s in sites.values()])
    pooled_val: Dataset[Any] = ConcatDataset([s.dataset("val") for s in sites.values()])
    return {
        "pooled_test": _score(model, pooled_test, settings, compute),
        "pooled_val": _score(model, pooled_val, settings, compute),
        "sites": {name: _score(model, s.dataset("test"), settings, compute) for name, s in sites.items()},
    }


class PooledData:
    """The union of several sites' data, shaped like one site's for :func:`common.local.train_round`."""

    def __init__(self, sites: list[SiteData]) -> None:
        self.sites = sites

    def dataset(self, part: str, *, augment: bool = False, seed: int = 0) -> _Pooled:
        return _Pooled([s.dataset(part, augment=augment, seed=seed) for s in self.sites])


class _Pooled(ConcatDataset[Any]):
    """A ConcatDataset whose epoch (augmentation draws) follows ``set_epoch`` like a site's."""

    def set_epoch(self, epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_epoch(epoch)  # type: ignore[attr-defined]


def train_baseline(data: TrainingData, settings: FederatedRunConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """A teacher trained on ``data`` with the site's own loop (:func:`common.local.train_round`):
    from the run's initial weights, for the epochs a site trains in the whole run, without DP,
    on the run's ``device`` as resolved on this machine (the weights come back on the CPU).

    It trains alone, after the federation, so it uses every core this process may run on (a
    site's ``num-threads`` is its share of the machine while all sites train at once)."""
    epochs = settings.run.num_rounds * settings.train.local_epochs
    initial = initial_teacher_state(settings.teacher, settings.task, settings.train.seed)
    threads = max(settings.train.num_threads, available_cores())
    outcome = train_round(
        data,
        settings.task,
        settings.teacher,
        initial,
        replace(settings.train, local_epochs=epochs, proximal_mu=0.0, num_threads=threads),
        seed=seed,
        compute=resolve_compute(settings.compute),
    )
    return outcome.state_dict


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def run_baselines(out: Path, settings: FederatedRunConfig, num_sites: int) -> dict[str, Any]:
    """Score the federated teacher and train + score the pooled and local-only teachers."""
    sites = load_sites(out, settings, num_sites)
    seed = settings.train.seed
    results: dict[str, Any] = {
        "budget_epochs": settings.run.num_rounds * settings.train.local_epochs,
        "federated": score_everywhere(
            load_model_state(out / "run" / "checkpoints" / "best.pt"), sites, settings
        ),
    }
    logger.info("Baseline: pooled teacher on %d sites' training splits", len(sites))
    pooled_state = train_baseline(
        PooledData(list(sites.values())), settings, seed=derive_seed(seed, "pooled")
    )
    results["pooled"] = score_everywhere(pooled_state, sites, settings)
    results["local"] = {}
    for name, site in sites.items():
        logger.info("Baseline: local-only teacher of %s", name)
        local_seed = derive_seed(seed, "local", name)
        state = train_baseline(site, settings, seed=local_seed)
        results["local"][name] = score_everywhere(state, sites, settings)
    write_json(out / "baselines.json", results)
    return results
