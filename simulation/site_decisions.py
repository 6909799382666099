"""Decisions at each site's own operating point, and their balanced accuracy, for one or many
bootstrap resamples at once.

A simulated site fits its operating point on its validation split
(:func:`common.operating_point.fit_operating_point`, criterion balanced accuracy); a model scored
on several sites' test splits is therefore decided at a different point on each. The baselines
(simulation/baselines.py) score the pooled test set this way, and the report's claims
(simulation/claims.py) bootstrap the same figures. Weights are bootstrap counts ``[B, N]`` (see
common/bootstrap.py); ``None`` is the plain figure.
"""

from __future__ import annotations

import math

import numpy as np

from common.bootstrap import nanmean_rows, weighted_auroc, weighted_rate
from common.operating_point import Criterion, fit_operating_point
from common.tasks import Task

SITE_CRITERION = Criterion("balanced-accuracy")


def decide_at_site_point(
    val_probabilities: np.ndarray,
    val_labels: np.ndarray,
    test_probabilities: np.ndarray,
    task: Task,
    criterion: Criterion = SITE_CRITERION,
) -> np.ndarray:
    """The test images' decisions at the operating point fitted on the site's validation split."""
    point = fit_operating_point(val_probabilities, val_labels, task, criterion)
    return point.decide(test_probabilities)


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones((1, n), dtype=np.int64) if weights is None else np.atleast_2d(weights)


def balanced_accuracy(
    decisions: np.ndarray, labels: np.ndarray, task: Task, weights: np.ndarray | None = None
) -> np.ndarray:
    """Balanced accuracy of fixed ``decisions`` (as :meth:`OperatingPoint.decide` gives them) per
    resample ``[B]``: the mean recall over the classes present in ``labels`` (multi-class), or
    the mean of (sensitivity + specificity) / 2 over the findings with a positive (multi-label),
    as :func:`common.operating_point.metrics_at` computes it."""
    labels = np.asarray(labels, dtype=np.float64)
    w = _weights(weights, len(labels))
    values = []
    for k in range(task.num_classes):
        if task.is_multilabel:
            known = ~np.isnan(labels[:, k])
            truth = known & (np.nan_to_num(labels[:, k]) > 0.5)
            chosen = np.asarray(decisions)[:, k] == 1
            if not truth.any():
                continue
            sensitivity = weighted_rate(chosen, truth, w)
            specificity = weighted_rate(~chosen, known & ~truth, w)
            values.append(np.where(np.isnan(specificity), sensitivity, (sensitivity + specificity) / 2))
        else:
            truth = labels[:, k] > 0.5
            if truth.any():
                values.append(weighted_rate(np.asarray(decisions) == k, truth, w))
    if not values:
        return np.full(w.shape[0], math.nan)
    return np.mean(np.stack(values), axis=0)


def macro_auroc(
    probabilities: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Mean one-vs-rest AUROC over the classes (findings) defined in each resample ``[B]``."""
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    w = _weights(weights, len(labels))
    per_class = []
    for k in range(labels.shape[1]):
        known = ~np.isnan(labels[:, k])
        per_class.append(weighted_auroc(labels[known, k] > 0.5, probabilities[known, k], w[:, known]))
    return nanmean_rows(per_class, w.shape[0])
