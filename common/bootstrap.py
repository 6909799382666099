"""Stratified bootstrap confidence intervals for AUROC and threshold metrics, vectorised with numpy.

A resample is represented by its *counts*: ``weights[b, i]`` is how many times image ``i``
was drawn in resample ``b`` (a multinomial draw within each stratum, so every resample keeps
the number of images of each stratum). Every statistic is then a weighted statistic over the
original images, computed for all resamples at once:

* AUROC is the Mann-Whitney probability that a positive scores above a negative (ties count
  one half). With the negatives sorted once by score, the weight of negatives below (and tied
  with) each positive is a cumulative sum per resample, gathered at positions that are the same
  for every resample. One finding costs O(B x N) memory and time: 1,000 resamples of 5,000
  images take a fraction of a second, no Python loop over resamples.
* Sensitivity, specificity and their mean are weighted counts of a fixed prediction.
* A macro mean is, per resample, the mean of the values defined in it (:func:`nanmean_rows`).

The interval is the percentile interval of the resampled values (2.5th and 97.5th percentiles
for 95%), the usual choice for AUROC in the medical imaging literature. A resample in which a
class has no positive or no negative example (possible only for unstratified classes, e.g. a
finding of a multi-label task) gives NaN and is left out; the number of finite resamples is
reported beside each interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval (NaN when undefined)."""

    value: float
    low: float
    high: float
    resamples: int
    """Resamples in which the statistic was defined (the interval is taken over these)."""

    def to_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "resamples": self.resamples}


def stratified_weights(strata: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Bootstrap counts ``[n_resamples, N]`` drawn with replacement within each stratum.

    ``strata`` holds one integer per image; each resample draws as many images from every
    stratum as it has, so class counts are the same in every resample. Deterministic in
    ``seed`` (numpy's PCG64).
    """
    if n_resamples < 1:
        raise ConfigError("bootstrap", n_resamples, "an integer >= 1 (number of resamples)")
    strata = np.asarray(strata)
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_resamples, strata.size), dtype=np.int32)
    rows = np.arange(n_resamples, dtype=np.int64)[:, None]
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        m = members.size
        picks = rng.integers(0, m, size=(n_resamples, m)) + rows * m
        weights[:, members] = np.bincount(picks.ravel(), minlength=n_resamples * m).reshape(n_resamples, m)
    return weights


def weighted_auroc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` against binary ``labels`` (``[N]``) under each row of ``weights``.

    ``weights`` is ``[B, N]`` (integer counts of a bootstrap resample, or ones for the plain
    AUROC); returns ``[B]``, NaN where a row has no positive or no negative weight.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.atleast_2d(weights)
    positive = np.flatnonzero(labels)
    negative = np.flatnonzero(~labels)
    if positive.size == 0 or negative.size == 0:
        return np.full(weights.shape[0], math.nan)
    order = negative[np.argsort(scores[negative], kind="stable")]
    sorted_negative_scores = scores[order]
    # integer counts keep the cumulative sums exact and half the memory of float64
    accumulate = np.int64 if weights.dtype.kind == "i" else np.float64
    cumulative = np.zeros((weights.shape[0], order.size + 1), dtype=accumulate)
    np.cumsum(weights[:, order], axis=1, dtype=accumulate, out=cumulative[:, 1:])
    below = np.searchsorted(sorted_negative_scores, scores[positive], side="left")
    up_to = np.searchsorted(sorted_negative_scores, scores[positive], side="right")
    negatives_below = cumulative[:, below]
    twice_pairs = 2 * negatives_below + (cumulative[:, up_to] - negatives_below)
    w_pos = weights[:, positive]
    numerator = 0.5 * np.einsum("bp,bp->b", w_pos, twice_pairs, dtype=np.float64)
    denominator = w_pos.sum(axis=1, dtype=np.float64) * cumulative[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), math.nan)


def weighted_rate(hits: np.ndarray, members: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per resample, the weighted share of ``members`` that are ``hits`` (``[B]``; NaN if none)."""
    weights = np.atleast_2d(weights)
    members = np.asarray(members, dtype=bool)
    hit_members = members & np.asarray(hits, dtype=bool)
    total = weights @ members.astype(weights.dtype)
    hit = weights @ hit_members.astype(weights.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hit / np.where(total > 0, total, 1), math.nan)


def percentile_interval(value: float, resampled: np.ndarray, level: float = 0.95) -> Interval:
    """``value`` with the ``level`` percentile interval of the finite ``resampled`` values."""
    if not 0.0 < level < 1.0:
        raise ConfigError("confidence level", level, "a number between 0 and 1, e.g. 0.95")
    finite = np.asarray(resampled, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or not math.isfinite(value):
        return Interval(float(value), math.nan, math.nan, int(finite.size))
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(float(value), float(low), float(high), int(finite.size))


def nanmean_rows(rows: list[np.ndarray], n: int) -> np.ndarray:
    """Per resample, the mean of the defined values of ``rows`` (NaN where none is defined)."""
    if not rows:
        return np.full(n, math.nan)
    stacked = np.vstack(rows)
    count = np.isfinite(stacked).sum(axis=0)
    total = np.nansum(stacked, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), math.nan)
