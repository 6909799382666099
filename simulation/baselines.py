"""Baselines of a simulated federation, evaluated on the same test images as the federated teacher.

- **federated**: the run's best global teacher (by federated validation);
- **pooled**: one teacher trained centrally on the union of every site's training split, for
  the same number of epochs a site trains in the whole run (rounds x local epochs), from the
  same initial weights and with the same optimiser settings;
- **local-only**: one teacher per site, trained on that site's training split alone, with the
  same budget.

Each site's split is recomputed with the exact code and seed the site used (common/local.py),
so the pooled test set is the union of the sites' test splits and no test image was trained on.
Every teacher is scored on the pooled test set and on each site's test split, with one forward
pass per split: the pooled figures come from the sites' per-image scores. ``pooled_test`` also
has ``op_balanced_accuracy``: every test image decided at its own site's operating point, fitted
for that teacher on the site's validation split (simulation/site_decisions.py), as a site decides.
The federated and pooled teachers' per-image test scores and decisions go to
``baselines_scores.npz`` for the report's bootstrap intervals (simulation/claims.py). (The student
without KD is trained at the sites during the distillation round, see ``kd-no-kd-baseline``.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
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
from common.metrics import compute_metrics
from common.run_settings import FederatedRunConfig
from common.training import EvalResult, evaluate
from simulation.experiment_folder import experiment_run
from simulation.site_decisions import balanced_accuracy, decide_at_site_point

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
            Path(run.cache_dir) if run.cache_dir else experiment_run(out).default_cache_dir,
        )
        sites[name] = load_site_data(request)
    return sites


SCORES_FILE = "baselines_scores.npz"


def evaluate_split(
    model: torch.nn.Module, dataset: Dataset[Any], settings: FederatedRunConfig, compute: Compute = CPU
) -> EvalResult:
    loader = DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, pin_memory=compute.pin_memory)
    return evaluate(model, loader, settings.task, device=compute.device)


def _figures(result: EvalResult) -> dict[str, float]:
    return {"n": float(result.n), **scalar_metrics(result, "")}


def pooled_result(results: list[EvalResult], settings: FederatedRunConfig) -> EvalResult:
    """One result for the union of several splits: metrics of the concatenated per-image scores,
    the loss weighted by images."""
    scores = np.concatenate([r.scores for r in results])
    targets = np.concatenate([r.targets for r in results])
    n = sum(r.n for r in results)
    loss = sum(r.loss * r.n for r in results) / n if n else float("nan")
    return EvalResult(loss, n, compute_metrics(settings.task, targets, scores), scores, targets)


@dataclass(frozen=True)
class TestScores:
    """A teacher's per-image scores on the pooled test set, site by site, in the sites' order."""

    probabilities: np.ndarray
    decisions: np.ndarray
    """Each image decided at its own site's operating point."""
    labels: np.ndarray
    site: np.ndarray
    """Index of the image's site (in the order of ``sites``)."""


def site_point_decisions(
    per_site: dict[str, dict[str, EvalResult]], settings: FederatedRunConfig
) -> TestScores:
    """Every site's test images decided at the point fitted on that site's validation split."""
    decisions = [
        decide_at_site_point(r["val"].scores, r["val"].targets, r["test"].scores, settings.task)
        for r in per_site.values()
    ]
    return TestScores(
        probabilities=np.concatenate([r["test"].scores for r in per_site.values()]),
        decisions=np.concatenate(decisions),
        labels=np.concatenate([r["test"].targets for r in per_site.values()]),
        site=np.concatenate([np.full(r["test"].n, i) for i, r in enumerate(per_site.values())]),
    )


def pooled_test_figures(
    per_site: dict[str, dict[str, EvalResult]], settings: FederatedRunConfig
) -> tuple[dict[str, float], TestScores]:
    """The figures on the union of the sites' test splits (argmax metrics of the concatenated
    scores) plus ``op_balanced_accuracy``: each image decided at its own site's operating point."""
    scores = site_point_decisions(per_site, settings)
    figures = _figures(pooled_result([r["test"] for r in per_site.values()], settings))
    figures["op_balanced_accuracy"] = float(
        balanced_accuracy(scores.decisions, scores.labels, settings.task)[0]
    )
    return figures, scores


def score_teacher(
    state: dict[str, torch.Tensor], sites: dict[str, SiteData], settings: FederatedRunConfig
) -> tuple[dict[str, Any], TestScores]:
    """A teacher's metrics on the pooled test set, the pooled validation set and each site's test
    split (one forward pass per site and split), and its per-image pooled test scores."""
    compute = resolve_compute(settings.compute)
    model = build_loaded_model(settings.teacher, settings.task, state).to(compute.device)
    per_site = {
        name: {part: evaluate_split(model, s.dataset(part), settings, compute) for part in ("val", "test")}
        for name, s in sites.items()
    }
    pooled_test, test_scores = pooled_test_figures(per_site, settings)
    figures = {
        "pooled_test": pooled_test,
        "pooled_val": _figures(pooled_result([r["val"] for r in per_site.values()], settings)),
        "sites": {name: _figures(r["test"]) for name, r in per_site.items()},
    }
    return figures, test_scores


def score_everywhere(
    state: dict[str, torch.Tensor], sites: dict[str, SiteData], settings: FederatedRunConfig
) -> dict[str, Any]:
    """A teacher's metrics on the pooled test set, the pooled validation set and each site's test split."""
    return score_teacher(state, sites, settings)[0]


def save_test_scores(path: Path, scores: dict[str, TestScores], sites: list[str]) -> None:
    """The per-image pooled test scores of the named teachers (labels and sites once)."""
    first = next(iter(scores.values()))
    arrays: dict[str, np.ndarray] = {"labels": first.labels, "site": first.site, "sites": np.array(sites)}
    for name, teacher in scores.items():
        arrays[f"{name}_probabilities"] = teacher.probabilities
        arrays[f"{name}_decisions"] = teacher.decisions
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


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


def train_baseline(
    data: TrainingData, settings: FederatedRunConfig, *, seed: int, threads: int | None = None
) -> dict[str, torch.Tensor]:
    """A teacher trained on ``data`` with the site's own loop (:func:`common.local.train_round`):
    from the run's initial weights, for the epochs a site trains in the whole run, without DP,
    on the run's ``device`` as resolved on this machine (the weights come back on the CPU).

    ``threads`` None: it trains alone, after the federation, so it uses every core this process
    may run on (a site's ``num-threads`` is its share of the machine while all sites train at
    once); the pooled teacher beside the federation uses one (simulation/pooled_background.py)."""
    epochs = settings.run.num_rounds * settings.train.local_epochs
    initial = initial_teacher_state(settings.teacher, settings.task, settings.train.seed)
    if threads is None:
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


def _local_teachers(sites: dict[str, SiteData], settings: FederatedRunConfig, seed: int) -> dict[str, Any]:
    """Each site's local-only teacher, scored everywhere."""
    scores = {}
    for name, site in sites.items():
        logger.info("Baseline: local-only teacher of %s", name)
        state = train_baseline(site, settings, seed=derive_seed(seed, "local", name))
        scores[name] = score_everywhere(state, sites, settings)
    return scores


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def run_baselines(
    out: Path,
    settings: FederatedRunConfig,
    num_sites: int,
    pooled_state: dict[str, torch.Tensor],
    *,
    local: bool = True,
) -> dict[str, Any]:
    """Score the federated teacher (and its start, when pretrained) and the pooled teacher
    (``pooled_state``, trained beside the federation: simulation/pooled_background.py) and, with
    ``local``, train and score a local-only teacher per site."""
    sites = load_sites(out, settings, num_sites)
    seed = settings.train.seed
    federated, federated_scores = score_teacher(
        load_model_state(experiment_run(out).checkpoint("best")), sites, settings
    )
    results: dict[str, Any] = {
        "budget_epochs": settings.run.num_rounds * settings.train.local_epochs,
        "federated": federated,
    }
    if settings.teacher.weights is not None:  # every teacher's start (the coordinator's pretraining)
        start = initial_teacher_state(settings.teacher, settings.task, seed)
        results["start"] = score_everywhere(start, sites, settings)
        results["start"]["weights"] = str(settings.teacher.weights)
    results["pooled"], pooled_scores = score_teacher(pooled_state, sites, settings)
    save_test_scores(out / SCORES_FILE, {"federated": federated_scores, "pooled": pooled_scores}, list(sites))
    results["local"] = _local_teachers(sites, settings, seed) if local else {}
    write_json(out / "baselines.json", results)
    return results
