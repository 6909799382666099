"""The coordinator's own labelled hold-out (run setting ``central-eval-manifest``).

Every round's global teacher is scored on it (``central_*`` columns of metrics.jsonl). With
``select-on = "coordinator"`` it also picks what the run delivers, where the sites' federated
validation cannot: the teacher of the round that scores best on it, the initial teacher (round
0) included, and likewise the federated student, the students' start included. A federation
whose sites each hold one class (the study's natural split) improves every site's validation
while losing a class that no site holds beside another; the coordinator's hold-out sees the loss,
and the run keeps the start unless a round beats it.

The hold-out is the coordinator's: public images it holds with their labels, disjoint from any
image its start was trained on (``cxr-fl-server pretrain`` writes the held-out part of its
images beside the weights for this). Nothing here reads a site's data or sends anything to a
site; choosing among models the sites receive anyway is post-processing under DP.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch.utils.data import DataLoader

from common.local import (
    EVAL_BATCH_SIZE,
    build_loaded_model,
    load_eval_dataset,
    scalar_metrics,
    site_data_request,
    student_config,
)
from common.run_settings import FederatedRunConfig
from common.training import evaluate
from server.rounds import improves
from server.run_folder import RunFolder

logger = logging.getLogger(__name__)

Scorer = Callable[[Mapping[str, torch.Tensor]], dict[str, float]]
"""A model's weights -> its scalar metrics on the coordinator's hold-out."""


def central_loader(settings: FederatedRunConfig) -> DataLoader | None:
    """The coordinator's hold-out, decoded like a site's images, or None when the run names none."""
    if not settings.run.central_eval_manifest:
        return None
    run_dir = Path(settings.run.run_dir) if settings.run.run_dir else Path.cwd()
    request = site_data_request(
        settings.run,
        settings.task,
        "manifest",
        Path(settings.run.central_eval_manifest),
        Path(settings.run.cache_dir) if settings.run.cache_dir else RunFolder(run_dir).default_cache_dir,
        whole=True,
    )
    dataset = load_eval_dataset(request)
    logger.info("Central evaluation on %d images of %s", len(dataset), settings.run.central_eval_manifest)
    return DataLoader(dataset, batch_size=EVAL_BATCH_SIZE)


def central_scorer(settings: FederatedRunConfig, loader: DataLoader, *, student: bool = False) -> Scorer:
    """Scores a global teacher's (or, with ``student``, a global student's) weights on ``loader``."""
    teacher = settings.teacher
    config = student_config(settings.distill, teacher, teacher.norm) if student else teacher

    def score(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        model = build_loaded_model(config, settings.task, state)
        return scalar_metrics(evaluate(model, loader, settings.task), "")

    return score


@dataclass
class BestOnHoldout:
    """The best of a sequence of models by one figure on the coordinator's hold-out."""

    score: Scorer
    metric: str
    best_round: int = -1
    best_metric: float = math.nan
    best: ArrayRecord | None = None

    def offer(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        """Score ``arrays`` and keep them when they beat the best so far; returns their
        ``central_`` metrics with ``central_best`` (1.0 if they are now the best)."""
        metrics = self.score(arrays.to_torch_state_dict())
        value = float(metrics.get(self.metric, math.nan))
        better = self.best is None or improves(value, self.best_metric, self.metric)
        if better:
            self.best_round, self.best_metric, self.best = server_round, value, arrays
        return {f"central_{k}": v for k, v in metrics.items()} | {"central_best": float(better)}

    def record(self) -> dict[str, Any]:
        """What summary.json keeps about the choice."""
        return {"selected_round": self.best_round, f"central_{self.metric}": self.best_metric}
