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

from common.checkpoint import load_model_state
from common.device import CPU, Compute, resolve_compute
from common.jsonio import write_json
from common.local import (
    EVAL_BATCH_SIZE,
    DataRequest,
    SiteData,
    build_loaded_model,
    derive_seed,
    load_site_data,
    scalar_metrics,
)
from common.run_settings import FederatedRunConfig
from common.training import evaluate, make_optimizer, seed_everything, train_one_epoch
from server.app import initial_teacher

logger = logging.getLogger(__name__)


def site_names(num_sites: int) -> list[str]:
    from client.site import site_name_for_partition

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


def train_centrally(
    datasets: list[Dataset[Any]], settings: FederatedRunConfig, *, seed: int
) -> dict[str, torch.Tensor]:
    """Train the teacher on ``datasets`` joined, with the budget a site has in the whole run.

    It trains on the run's ``device`` setting as resolved on this machine (``auto``: CUDA when
    present), with mixed precision there when ``amp`` is on; the weights come back on the CPU.
    """
    epochs = settings.run.num_rounds * settings.train.local_epochs
    compute = resolve_compute(settings.compute)
    state = initial_teacher(settings).to_torch_state_dict()
    seed_everything(seed)
    model = build_loaded_model(settings.teacher, settings.task, state).to(compute.device)
    train_set = ConcatDataset(datasets)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train_set,
        batch_size=settings.train.batch_size,
        shuffle=True,
        generator=generator,
        pin_memory=compute.pin_memory,
    )
    optimizer = make_optimizer(model, settings.train)
    scaler = compute.grad_scaler()
    for epoch in range(epochs):
        for dataset in datasets:
            dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        train_one_epoch(model, loader, settings.task, optimizer, device=compute.device, scaler=scaler)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


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
