"""Local losses against label skew: the site corrects its logits for its own class mix in training.

Under label skew a site's cross-entropy pulls the shared classifier towards the site's majority
classes; averaged over sites whose majorities differ, the global model's argmax can collapse onto
one class while its ranking (AUROC) still improves. The run setting ``local-loss`` picks a loss
that corrects the logits *during local training only* (evaluation, export and prediction use the
model's raw logits):

- ``ce``: plain cross-entropy (no correction).
- ``balanced-softmax``: cross-entropy on ``logits + log(prior_c)``, ``prior`` the site's own
  training class frequencies (Ren et al. NeurIPS 2020; logit adjustment, Menon et al. ICLR 2021).
  The raw logits then estimate the class-balanced posterior, whatever the site's mix.
- ``fedlc``: cross-entropy on ``logits - tau * n_c ** (-1/4)`` (FedLC, Zhang et al. ICML 2022,
  ``tau`` = :data:`FEDLC_TAU`), ``n_c`` the site's own training counts.
- ``fedrs``: restricted softmax (FedRS, Li and Zhan KDD 2021): the logits of classes the site has
  no training image of are scaled by :data:`FEDRS_ALPHA`, so the site's loss pushes them down less.
  The paper scales the classifier weights of those classes; scaling the logit also scales the
  bias (a small difference, stated here).

A class the site lacks counts as :data:`ABSENT_CLASS_COUNT` images (half an image) in the priors
and counts, so every correction stays finite.

Privacy: the class counts are computed at the site from its own training split and never leave it
(only the trained weights do, as with ``ce``). Under DP-SGD a correction made from the counts puts
them into every per-sample gradient (one image more or less changes every other image's
gradient), which breaks DP-SGD's per-sample sensitivity bound; no DP-safe count estimate is
implemented. So DP and a correction are never combined: a run that asks for both is refused when
its settings are checked (common/run_settings.py), and a site whose *own* policy turns DP on
trains with ``ce`` and logs why (common/local.py :func:`~common.local.train_round`). Multi-label
tasks (one sigmoid per finding) keep their masked binary cross-entropy; a correction is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.errors import ConfigError, DataError
from common.tasks import Task

CE = "ce"
FEDLC_TAU = 1.0
"""FedLC's calibration strength tau."""
FEDRS_ALPHA = 0.5
"""FedRS's scaling of the logits of classes missing at the site (the paper's alpha)."""
ABSENT_CLASS_COUNT = 0.5
"""The count a class with no training image at the site is given (keeps every correction finite)."""


@dataclass(frozen=True)
class LogitAdjustment:
    """``logits * scale + offset`` per class, applied to the training logits only."""

    kind: str
    scale: Tensor
    offset: Tensor

    def apply(self, logits: Tensor) -> Tensor:
        scale = self.scale.to(device=logits.device, dtype=logits.dtype)
        offset = self.offset.to(device=logits.device, dtype=logits.dtype)
        return logits * scale + offset


def check_local_loss(kind: str, task: Task, *, dp_enabled: bool) -> None:
    """ConfigError naming ``local-loss`` when the correction cannot be used for this run."""
    if kind == CE:
        return
    if task.is_multilabel:
        raise ConfigError(
            "local-loss",
            kind,
            f"\"ce\" for the multi-label task '{task.name}' (its findings keep their binary "
            "cross-entropy; the label-skew corrections are for single-label tasks)",
        )
    if dp_enabled:
        raise ConfigError(
            "local-loss",
            kind,
            '"ce" when DP-SGD is on (dp-enabled = true): the correction is made from the site\'s class '
            "counts, which would enter every per-sample gradient and break DP-SGD's guarantee",
        )


def label_counts(targets: np.ndarray | Tensor, num_classes: int) -> np.ndarray:
    """Training images per class from one-hot targets ``[n, C]``."""
    array = np.asarray(targets, dtype=np.float64).reshape(-1, num_classes)
    if np.isnan(array).any():
        raise DataError("single-label targets contain NaN; every training image needs a label.")
    return array.sum(axis=0)


def dataset_label_counts(dataset: object, num_classes: int) -> np.ndarray:
    """Per-class counts of a site's training dataset (a CxrDataset, or a ConcatDataset of them)."""
    parts: Sequence[object] | None = getattr(dataset, "datasets", None)
    if parts is not None:
        return sum((dataset_label_counts(p, num_classes) for p in parts), np.zeros(num_classes))
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise DataError(f"{type(dataset).__name__} has no 'targets' to count the site's classes from")
    return label_counts(targets, num_classes)


def logit_adjustment(kind: str, counts: np.ndarray | Sequence[float]) -> LogitAdjustment | None:
    """The correction named by ``kind`` for a site with these per-class training counts (None: ``ce``)."""
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size < 2 or (n < 0).any() or not np.isfinite(n).all():
        raise DataError(f"class counts must be >= 0, one per class (at least 2); got {n.tolist()}")
    if kind == CE:
        return None
    effective = np.where(n > 0, n, ABSENT_CLASS_COUNT)
    ones = np.ones_like(n)
    if kind == "balanced-softmax":
        scale, offset = ones, np.log(effective / effective.sum())
    elif kind == "fedlc":
        scale, offset = ones, -FEDLC_TAU * effective ** (-0.25)
    elif kind == "fedrs":
        scale, offset = np.where(n > 0, 1.0, FEDRS_ALPHA), np.zeros_like(n)
    else:
        raise ConfigError("local-loss", kind, "one of ce, balanced-softmax, fedlc, fedrs")
    if not (np.isfinite(scale).all() and np.isfinite(offset).all()):  # pragma: no cover - by construction
        raise DataError(f"the {kind} correction of counts {n.tolist()} is not finite")
    return LogitAdjustment(
        kind, torch.tensor(scale, dtype=torch.float32), torch.tensor(offset, dtype=torch.float32)
    )


def describe(adjustment: LogitAdjustment | None) -> str:
    """A log line's worth: the correction's kind and its offsets/scales (stays in the site's log)."""
    if adjustment is None:
        return CE
    offsets = ", ".join(f"{v:.2f}" for v in adjustment.offset.tolist())
    scales = ", ".join(f"{v:.2f}" for v in adjustment.scale.tolist())
    return f"{adjustment.kind} (offset [{offsets}], scale [{scales}])"
