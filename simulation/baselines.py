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
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from client.site import site_name_for_partition
from common.checkpoint import load_model_state
from common.jsonio import write_json
from common.local import (
    EVAL_BATCH_SIZE,
    DataRequest,
    SiteData,
    build_loaded_model,
    derive_seed,
    initial_teacher_state,
    load_site_data,
    scalar_metrics,
)
from common.run_settings import FederatedRunConfig
from common.training import evaluate, make_optimizer, seed_everything, train_one_epoch

logger = logging.getLogger(__name__)


def site_names(num_sites: int) -> list[str]:
    return [site_name_for_partition(i) for i in range(num_sites)]


def load_sites(out: Path, settings: FederatedRunConfig, num_sites: int) -> dict[str, SiteData]:
    """Every site's data exactly as the site itself prepared it (same cache, same split seed)."""
    run = settings.run
    sites = {}
    for name in site_names(num_sites):
        request = DataRequest(
            data_format="manifest",
            data_path=Path(run.simulation_manifest_dir) / f"{name}.csv",
            task=settings.task,
            image_size=run.image_size,
            cache_dir=Path(run.cache_dir) if run.cache_dir else out / "run" / "cache",
            val_fraction=run.val_fraction,
            test_fraction=run.test_fraction,
            split_seed=run.split_seed,
        )
        sites[name] = load_site_data(request)
    return sites


def _score(model: torch.nn.Module, dataset: Dataset[Any], settings: FederatedRunConfig) -> dict[str, float]:
    result = evaluate(model, DataLoader(dataset, batch_size=EVAL_BATCH_SIZE), settings.task)
    return {"n": float(result.n), **scalar_metrics(result, "")}


def score_everywhere(
    state: dict[str, torch.Tensor], sites: dict[str, SiteData], settings: FederatedRunConfig
) -> dict[str, Any]:
    """A teacher's metrics on the pooled test set, the pooled validation set and each site's test split."""
    model = build_loaded_model(settings.teacher, settings.task, state)
    return {
        "pooled_test": _score(model, ConcatDataset([s.dataset("test") for s in sites.values()]), settings),
        "pooled_val": _score(model, ConcatDataset([s.dataset("val") for s in sites.values()]), settings),
        "sites": {name: _score(model, s.dataset("test"), settings) for name, s in sites.items()},
    }


def train_centrally(
    datasets: list[Dataset[Any]], settings: FederatedRunConfig, *, seed: int
) -> dict[str, torch.Tensor]:
    """Train the teacher on ``datasets`` joined, with the budget a site has in the whole run."""
    epochs = settings.run.num_rounds * settings.train.local_epochs
    state = initial_teacher_state(settings.teacher, settings.task, settings.train.seed)
    seed_everything(seed)
    model = build_loaded_model(settings.teacher, settings.task, state)
    train_set = ConcatDataset(datasets)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=settings.train.batch_size, shuffle=True, generator=generator)
    optimizer = make_optimizer(model, settings.train)
    for epoch in range(epochs):
        for dataset in datasets:
            dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        train_one_epoch(model, loader, settings.task, optimizer)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
    pooled_state = train_centrally(
        [s.dataset("train", augment=True, seed=derive_seed(seed, "pooled")) for s in sites.values()],
        settings,
        seed=derive_seed(seed, "pooled"),
    )
    results["pooled"] = score_everywhere(pooled_state, sites, settings)
    results["local"] = {}
    for name, site in sites.items():
        logger.info("Baseline: local-only teacher of %s", name)
        local_seed = derive_seed(seed, "local", name)
        state = train_centrally(
            [site.dataset("train", augment=True, seed=local_seed)], settings, seed=local_seed
        )
        results["local"][name] = score_everywhere(state, sites, settings)
    write_json(out / "baselines.json", results)
    return results
