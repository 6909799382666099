"""Classification metrics for both task kinds, computed with scikit-learn.

:func:`compute_metrics` takes the label matrix and the predicted probabilities of one evaluation
(``[N, C]`` each, the label convention of :mod:`common.tasks`) and returns a frozen
:class:`Metrics`. Its :meth:`Metrics.scalars` view is a flat ``dict[str, float]`` with stable
names, ready for Flower's MetricRecord and for report tables:

* ``accuracy``, ``balanced_accuracy``, ``auroc_macro``, ``f1_macro``
* ``auroc/<class>``, ``sensitivity/<class>``, ``specificity/<class>``, ``f1/<class>``

Multi-class: predictions are the argmax of the scores; AUROC is one-vs-rest per class.
Multi-label: each finding is scored on the images whose label is known (NaN labels are masked
per finding), predictions are ``score >= threshold`` (0.5 by default); ``accuracy`` is the
fraction of known labels predicted correctly and ``balanced_accuracy`` is the mean over findings
of (sensitivity + specificity) / 2.

A value that is undefined on the data (AUROC of a class with no positive or no negative example,
sensitivity of a class that never occurs) is NaN and is left out of the macro means; the reason
is recorded in :attr:`Metrics.notes`. The confusion matrix (or, for multi-label, one 2x2 matrix
per finding) is kept as nested lists outside the scalar view.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from common.errors import DataError
from common.tasks import Task, TaskKind

# scikit-learn is imported where it is used: it takes over a second to import, and a ClientApp
# process that only trains (a new process per Flower message) never computes metrics.

logger = logging.getLogger(__name__)

SCALAR_NAMES: tuple[str, ...] = ("accuracy", "balanced_accuracy", "auroc_macro", "f1_macro")
PER_CLASS_NAMES: tuple[str, ...] = ("auroc", "sensitivity", "specificity", "f1")


@dataclass(frozen=True)
class Metrics:
    """The metrics of one evaluation of one task. Undefined values are NaN (see ``notes``)."""

    kind: TaskKind
    classes: tuple[str, ...]
    n: int
    accuracy: float
    balanced_accuracy: float
    auroc_macro: float
    f1_macro: float
    auroc: tuple[float, ...]
    sensitivity: tuple[float, ...]
    specificity: tuple[float, ...]
    f1: tuple[float, ...]
    confusion: list[Any] = field(hash=False)
    """Multi-class: ``C x C`` counts, rows = true class, columns = predicted class.
    Multi-label: one ``[[tn, fp], [fn, tp]]`` per finding."""
    notes: tuple[str, ...] = ()

    def scalars(self) -> dict[str, float]:
        """Flat ``name -> float`` view with stable names (no confusion matrix, no notes)."""
        out = {name: float(getattr(self, name)) for name in SCALAR_NAMES}
        for name in PER_CLASS_NAMES:
            for class_name, value in zip(self.classes, getattr(self, name), strict=True):
                out[f"{name}/{class_name}"] = float(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything, as JSON-friendly builtins (NaN stays a float NaN)."""
        out = asdict(self)
        out["classes"] = list(self.classes)
        for name in (*PER_CLASS_NAMES, "notes"):
            out[name] = list(out[name])
        return out


def _check_inputs(task: Task, targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    targets = np.asarray(targets, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    c = task.num_classes
    if targets.ndim != 2 or targets.shape[1] != c:
        raise DataError(
            f"targets have shape {targets.shape}; task '{task.name}' needs [N, {c}] "
            f"(one column per class: {', '.join(task.classes)})."
        )
    if scores.shape != targets.shape:
        raise DataError(
            f"scores have shape {scores.shape} but targets have shape {targets.shape}; "
            "pass one row of class probabilities per labelled image."
        )
    if not np.all(np.isfinite(scores)):
        raise DataError(
            "scores contain NaN or infinite values; the model has probably diverged (lower 'lr')."
        )
    if task.kind == "multiclass":
        if np.isnan(targets).any():
            raise DataError(
                f"multi-class targets of task '{task.name}' contain NaN; each image needs a label."
            )
        one_hot = np.all((targets == 0) | (targets == 1), axis=1) & (targets.sum(axis=1) == 1)
        if not one_hot.all():
            row = int(np.argmin(one_hot))
            raise DataError(
                f"multi-class targets must be one-hot; row {row} is {targets[row].tolist()}. "
                "Use one column per class with a single 1."
            )
    else:
        known = targets[~np.isnan(targets)]
        if not np.all((known == 0) | (known == 1)):
            raise DataError(f"multi-label targets of task '{task.name}' must be 1, 0 or NaN (unknown).")
    return targets, scores


def preload_scorers() -> None:
    """Import scikit-learn's metrics now. They are imported on first use so that the CLIs start
    quickly, but that first use costs 2-3 s on a 2-core machine: a long-lived process that will
    score (the warm site runner) pays it at start-up instead of inside a federated round."""
    import sklearn.metrics  # noqa: F401


def nanmean(values: Sequence[float]) -> float:
    """The mean of the defined (finite) values; NaN when none is defined."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def binary_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC of scores ``s`` for binary labels ``y`` (scikit-learn); NaN without both labels."""
    if y.size == 0 or np.all(y == y[0]):
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def ratio(num: int, den: int) -> float:
    """``num / den``, NaN for an empty denominator (a rate of a class with no member)."""
    return num / den if den > 0 else math.nan


def binary_counts(
    chosen: np.ndarray, positive: np.ndarray, negative: np.ndarray
) -> tuple[int, int, int, int]:
    """``(tn, fp, fn, tp)`` of boolean decisions ``chosen`` among the ``positive`` and ``negative``
    images (boolean masks; an image in neither, e.g. an unknown label, is not counted)."""
    tp, fp = int(np.sum(chosen & positive)), int(np.sum(chosen & negative))
    fn, tn = int(np.sum(~chosen & positive)), int(np.sum(~chosen & negative))
    return tn, fp, fn, tp


def _multiclass(task: Task, targets: np.ndarray, scores: np.ndarray) -> Metrics:
    from sklearn.metrics import confusion_matrix, f1_score

    c = task.num_classes
    y_true = targets.argmax(axis=1)
    y_pred = scores.argmax(axis=1)
    labels = list(range(c))
    # scikit-learn refuses empty inputs; with no image every metric is undefined
    cm = confusion_matrix(y_true, y_pred, labels=labels) if y_true.size else np.zeros((c, c), dtype=int)
    notes: list[str] = []
    auroc, sens, spec = [], [], []
    total = int(cm.sum())
    for k, name in enumerate(task.classes):
        tp = int(cm[k, k])
        fn = int(cm[k, :].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = total - tp - fn - fp
        sens.append(ratio(tp, tp + fn))
        spec.append(ratio(tn, tn + fp))
        value = binary_auroc((y_true == k).astype(int), scores[:, k])
        if math.isnan(value):
            if total == 0:
                why = "no images were evaluated"
            else:
                why = f"{'every' if tp + fn == total else 'no'} image has this label"
            notes.append(f"class '{name}': {why}; its AUROC is undefined (NaN).")
        auroc.append(value)
    f1 = [math.nan] * c
    if y_true.size:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero-division cases are NaN by choice
            per_f1 = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
        f1 = [float(v) for v in per_f1]
    present = [k for k in labels if cm[k, :].sum() > 0]
    balanced = float(np.mean([sens[k] for k in present])) if present else math.nan
    return Metrics(
        kind="multiclass",
        classes=task.classes,
        n=int(targets.shape[0]),
        accuracy=float(np.trace(cm) / total) if total else math.nan,
        balanced_accuracy=balanced,
        auroc_macro=nanmean(auroc),
        f1_macro=nanmean(f1),
        auroc=tuple(auroc),
        sensitivity=tuple(sens),
        specificity=tuple(spec),
        f1=tuple(f1),
        confusion=cm.astype(int).tolist(),
        notes=tuple(notes),
    )


def _multilabel(task: Task, targets: np.ndarray, scores: np.ndarray, threshold: float) -> Metrics:

    notes: list[str] = []
    auroc, sens, spec, f1, confusion = [], [], [], [], []
    correct = known_total = 0
    for k, name in enumerate(task.classes):
        mask = ~np.isnan(targets[:, k])
        y = targets[mask, k].astype(int)
        s = scores[mask, k]
        tn, fp, fn, tp = binary_counts(s >= threshold, y == 1, y == 0)
        confusion.append([[tn, fp], [fn, tp]])
        correct += tp + tn
        known_total += y.size
        value = binary_auroc(y, s)
        if math.isnan(value):
            kind = "positive" if y.size and y[0] == 1 else "negative"
            why = "no labelled image" if y.size == 0 else f"only {kind} labels"
            notes.append(f"finding '{name}': {why}; its AUROC is undefined (NaN).")
        auroc.append(value)
        sens.append(ratio(tp, tp + fn))
        spec.append(ratio(tn, tn + fp))
        f1.append(ratio(2 * tp, 2 * tp + fp + fn))
    balanced = [(a + b) / 2 for a, b in zip(sens, spec, strict=True)]
    return Metrics(
        kind="multilabel",
        classes=task.classes,
        n=int(targets.shape[0]),
        accuracy=ratio(correct, known_total),
        balanced_accuracy=nanmean(balanced),
        auroc_macro=nanmean(auroc),
        f1_macro=nanmean(f1),
        auroc=tuple(auroc),
        sensitivity=tuple(sens),
        specificity=tuple(spec),
        f1=tuple(f1),
        confusion=confusion,
        notes=tuple(notes),
    )


def compute_metrics(
    task: Task, targets: np.ndarray, scores: np.ndarray, *, threshold: float = 0.5
) -> Metrics:
    """Metrics of ``scores`` (probabilities, ``[N, C]``) against ``targets`` (``[N, C]``).

    ``targets`` are one-hot for multi-class tasks and 1 / 0 / NaN for multi-label tasks.
    ``threshold`` turns multi-label probabilities into predictions; multi-class uses argmax.
    Raises :class:`~common.errors.DataError` when shapes or label values do not fit the task.
    """
    targets, scores = _check_inputs(task, targets, scores)
    if task.kind == "multiclass":
        metrics = _multiclass(task, targets, scores)
    else:
        metrics = _multilabel(task, targets, scores, threshold)
    for note in metrics.notes:
        logger.debug("%s", note)
    return metrics
