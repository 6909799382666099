"""A site's own decision rule ("operating point"), fitted on its validation split.

A model's argmax is the decision rule of the federation's class mix; a hospital whose mix
differs needs its own. The site fits one on its validation split (never sent anywhere: the
biases and thresholds encode its class mix) and every later decision uses it: the exported
student carries it in its preprocessing JSON and model card, and ``predict``, ``evaluate`` and
``explain`` apply it.

* multi-class: ``decision = argmax_c(log p_c + bias_c)``; the per-class log-prior shift
  ``bias`` (``bias_0 = 0``) is fitted by coordinate ascent on the criterion, starting from the
  shift that divides out the model's mean predicted class mix. Adding a log prior
  ratio is how a classifier is moved to another class mix (Saerens et al., Neural Computation
  2002); fitting it on labelled validation images also corrects a model whose argmax collapsed.
* multi-label: a probability threshold per finding, fitted the same way.

Criteria (the site's choice, ``--operating-point``): ``argmax`` (no fit: bias 0 / threshold 0.5),
``balanced-accuracy`` (the default: maximise it on the validation split), or
``sensitivity:CLASS=X[,CLASS=Y]``: balanced accuracy first, then the smallest shift of each named
class that reaches the target sensitivity on the validation split. A class (or finding) the
validation split lacks is not searched: multi-class, it keeps its balancing shift (a search on a
split without it would push it to the floor, so the site would never again choose a class it has
not seen yet); multi-label, its threshold stays 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import ConfigError, ModelError
from common.tasks import Task

OPERATING_POINT_FORMAT = "cxr-fl-operating-point-1"
CRITERIA = ("argmax", "balanced-accuracy", "sensitivity")
BIAS_LIMIT = 12.0
"""Largest shift of a class's log-probability (exp(12) ~ 160000x its prior): beyond it the class
is never (or always) chosen on any real data, and JSON stays finite."""
_SWEEPS = 4
_EPS = 1e-12


@dataclass(frozen=True)
class Criterion:
    """How a site chooses its operating point: ``name`` in :data:`CRITERIA`, plus per-class
    target sensitivities for ``sensitivity``."""

    name: str = "balanced-accuracy"
    targets: tuple[tuple[str, float], ...] = ()

    def __str__(self) -> str:
        if self.name != "sensitivity":
            return self.name
        return "sensitivity:" + ",".join(f"{c}={v:g}" for c, v in self.targets)


def parse_criterion(text: str, task: Task, option: str = "--operating-point") -> Criterion:
    """``argmax`` | ``balanced-accuracy`` | ``sensitivity:CLASS=X[,CLASS=Y]`` (ConfigError otherwise)."""
    expected = "argmax, balanced-accuracy, or sensitivity:CLASS=X[,CLASS=Y] with X in (0, 1]"
    name, _, rest = str(text).strip().partition(":")
    if name in ("argmax", "balanced-accuracy") and not rest:
        return Criterion(name)
    if name != "sensitivity" or not rest:
        raise ConfigError(option, text, expected)
    targets: list[tuple[str, float]] = []
    for part in rest.split(","):
        cls, sep, value = part.partition("=")
        try:
            target = float(value)
        except ValueError:
            raise ConfigError(option, text, expected) from None
        if not sep or not 0.0 < target <= 1.0:
            raise ConfigError(option, text, expected)
        if cls.strip() not in task.classes:
            raise ConfigError(option, text, f"{expected}; CLASS one of {', '.join(task.classes)}")
        targets.append((cls.strip(), target))
    return Criterion("sensitivity", tuple(targets))


@dataclass(frozen=True)
class OperatingPoint:
    """A fitted decision rule; :meth:`decide` turns probabilities into decisions."""

    criterion: str
    task_kind: str
    classes: tuple[str, ...]
    log_prior_shift: tuple[float, ...] = ()  # multi-class
    thresholds: tuple[float, ...] = ()  # multi-label
    fitted_on_images: int = 0
    validation_balanced_accuracy: float = math.nan
    format: str = field(default=OPERATING_POINT_FORMAT)

    @classmethod
    def argmax(cls, task: Task) -> OperatingPoint:
        """The model's own rule: argmax (multi-class) or 0.5 per finding (multi-label)."""
        return cls.model_rule(task.kind, tuple(task.classes))

    @classmethod
    def model_rule(cls, task_kind: str, classes: tuple[str, ...]) -> OperatingPoint:
        """:meth:`argmax` from a task's kind and classes (a model file names them, not its task)."""
        c = len(classes)
        if task_kind == "multilabel":
            return cls("argmax", task_kind, tuple(classes), thresholds=(0.5,) * c)
        return cls("argmax", task_kind, tuple(classes), log_prior_shift=(0.0,) * c)

    @property
    def is_model_rule(self) -> bool:
        """True for the model's own rule (nothing fitted): decisions are the plain argmax / 0.5."""
        return self.criterion == "argmax"

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Multi-class: class index per image ``[N]``; multi-label: 0/1 matrix ``[N, C]``."""
        p = np.asarray(probabilities, dtype=np.float64)
        if self.task_kind == "multilabel":
            return (p >= np.asarray(self.thresholds)[None, :]).astype(np.int64)
        return _decide_multiclass(np.log(np.clip(p, _EPS, 1.0)), np.asarray(self.log_prior_shift))

    def decided_names(self, probabilities: np.ndarray) -> list[str]:
        """The decision of each image as text: its class (multi-class), or the findings decided
        positive joined by ``"; "`` (multi-label; ``"no finding"`` when none)."""
        decided = self.decide(probabilities)
        if self.task_kind != "multilabel":
            return [self.classes[int(k)] for k in decided]
        return [
            "; ".join(c for c, d in zip(self.classes, row, strict=True) if d) or "no finding"
            for row in decided
        ]

    def describe(self) -> str:
        """One line for reports and model cards (no class counts)."""
        if self.criterion == "argmax":
            return "argmax (the model's own rule)"
        values = self.thresholds if self.task_kind == "multilabel" else self.log_prior_shift
        kind = "threshold" if self.task_kind == "multilabel" else "log-prior shift"
        parts = ", ".join(
            f"{c} {v:+.2f}" if kind != "threshold" else f"{c} {v:.3f}"
            for c, v in zip(self.classes, values, strict=True)
        )
        return f"{self.criterion} on the site's validation split ({kind}: {parts})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "criterion": self.criterion,
            "task_kind": self.task_kind,
            "classes": list(self.classes),
            "log_prior_shift": list(self.log_prior_shift),
            "thresholds": list(self.thresholds),
            "fitted_on_images": self.fitted_on_images,
            "validation_balanced_accuracy": None
            if math.isnan(self.validation_balanced_accuracy)
            else self.validation_balanced_accuracy,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "operating point") -> OperatingPoint:
        """Parse and check (ModelError naming ``source`` on anything malformed)."""
        if not isinstance(data, Mapping) or data.get("format") != OPERATING_POINT_FORMAT:
            raise ModelError(f"{source}: not a {OPERATING_POINT_FORMAT} operating point; re-export the model")
        try:
            classes = tuple(str(c) for c in data["classes"])
            shift = tuple(float(v) for v in data.get("log_prior_shift") or ())
            thresholds = tuple(float(v) for v in data.get("thresholds") or ())
            val = data.get("validation_balanced_accuracy")
            point = cls(
                criterion=str(data["criterion"]),
                task_kind=str(data["task_kind"]),
                classes=classes,
                log_prior_shift=shift,
                thresholds=thresholds,
                fitted_on_images=int(data.get("fitted_on_images", 0)),
                validation_balanced_accuracy=math.nan if val is None else float(val),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source} is missing or has a bad field ({exc}); re-export the model") from None
        point.check(source)
        return point

    def check(self, source: str) -> None:
        """ModelError naming ``source`` unless every value is finite and in range, one per class."""
        if self.task_kind not in ("multiclass", "multilabel") or not self.classes:
            raise ModelError(
                f"{source}: task_kind must be multiclass or multilabel, with classes; re-export the model"
            )
        values = self.thresholds if self.task_kind == "multilabel" else self.log_prior_shift
        if len(values) != len(self.classes) or not all(math.isfinite(v) for v in values):
            raise ModelError(f"{source}: one finite value per class expected; re-export the model")
        if self.task_kind == "multilabel" and not all(0.0 <= v <= 1.0 for v in values):
            raise ModelError(f"{source}: thresholds must be probabilities; re-export the model")
        if self.task_kind != "multilabel" and not all(abs(v) <= BIAS_LIMIT for v in values):
            raise ModelError(f"{source}: log-prior shifts beyond +-{BIAS_LIMIT:g}; re-export the model")
        score = self.validation_balanced_accuracy
        if not (math.isnan(score) or 0.0 <= score <= 1.0):
            raise ModelError(f"{source}: validation_balanced_accuracy must be in [0, 1]; re-export the model")


def _decide_multiclass(log_p: np.ndarray, shift: np.ndarray) -> np.ndarray:
    return np.argmax(log_p + shift[None, :], axis=1)


def _balanced_accuracy(true: np.ndarray, predicted: np.ndarray, present: np.ndarray) -> float:
    """Mean recall over the classes present in ``true`` (``present``: their indices)."""
    return float(np.mean([np.mean(predicted[true == c] == c) for c in present]))


def _candidate_shifts(log_p: np.ndarray, shift: np.ndarray, c: int) -> np.ndarray:
    """Values of ``shift[c]`` at which some image's decision changes, as midpoints, plus the limits."""
    others = np.delete(log_p + shift[None, :], c, axis=1).max(axis=1)
    flips = np.unique(np.clip(others - log_p[:, c], -BIAS_LIMIT, BIAS_LIMIT))
    mids = (flips[:-1] + flips[1:]) / 2.0 if flips.size > 1 else flips
    return np.unique(np.concatenate([mids, [-BIAS_LIMIT, 0.0, BIAS_LIMIT], flips - 1e-6, flips + 1e-6]))


def _best_shift(log_p: np.ndarray, true: np.ndarray, shift: np.ndarray, c: int, present: np.ndarray) -> float:
    """The value of ``shift[c]`` that maximises balanced accuracy (ties: the one closest to 0)."""
    best_value, best_score = shift[c], -1.0
    trial = shift.copy()
    for value in sorted(_candidate_shifts(log_p, shift, c), key=abs):
        trial[c] = value
        score = _balanced_accuracy(true, _decide_multiclass(log_p, trial), present)
        if score > best_score + 1e-12:
            best_value, best_score = float(value), score
    return best_value


def _reach_sensitivity(
    log_p: np.ndarray, true: np.ndarray, shift: np.ndarray, c: int, target: float
) -> float:
    """The smallest ``shift[c]`` >= its current value whose validation sensitivity of ``c`` >= target."""
    members = true == c
    if not members.any():
        return float(shift[c])
    trial = shift.copy()
    for value in np.sort(_candidate_shifts(log_p, shift, c)):
        if value < shift[c]:
            continue
        trial[c] = value
        if np.mean(_decide_multiclass(log_p[members], trial) == c) >= target:
            return float(value)
    return BIAS_LIMIT


def _balancing_shift(log_p: np.ndarray) -> np.ndarray:
    """The start of the search: divide out the model's mean predicted class mix on these images
    (one Saerens-style step towards equal priors), which undoes a collapsed argmax at once."""
    mean_p = np.exp(log_p).mean(axis=0)
    return np.clip(-np.log(np.clip(mean_p, _EPS, 1.0)), -BIAS_LIMIT, BIAS_LIMIT)


def _fit_multiclass(
    probabilities: np.ndarray, labels: np.ndarray, task: Task, criterion: Criterion
) -> OperatingPoint:
    log_p = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1.0))
    true = np.argmax(labels, axis=1)
    present = np.unique(true)
    shift = _balancing_shift(log_p)
    for _ in range(_SWEEPS):
        before = shift.copy()
        for c in present:  # a class the split lacks keeps its balancing shift (see the docstring)
            shift[c] = _best_shift(log_p, true, shift, c, present)
        if np.allclose(before, shift):
            break
    for name, target in criterion.targets:
        c = task.index(name)
        shift[c] = _reach_sensitivity(log_p, true, shift, c, target)
    shift = np.clip(shift - shift[0], -BIAS_LIMIT, BIAS_LIMIT)  # only differences matter
    score = _balanced_accuracy(true, _decide_multiclass(log_p, shift), present)
    return OperatingPoint(
        str(criterion),
        task.kind,
        tuple(task.classes),
        log_prior_shift=tuple(float(v) for v in shift),
        fitted_on_images=len(true),
        validation_balanced_accuracy=score,
    )


def _fit_threshold(p: np.ndarray, y: np.ndarray, target: float | None) -> float:
    """Threshold of one finding: max sensitivity+specificity, or the highest reaching ``target``."""
    known = ~np.isnan(y)
    p, y = p[known], y[known] > 0.5
    if y.all() or not y.any():
        return 0.5
    candidates = np.unique(np.concatenate([p, [0.5]]))
    sens = np.array([np.mean(p[y] >= t) for t in candidates])
    spec = np.array([np.mean(p[~y] < t) for t in candidates])
    if target is not None:
        reaching = np.flatnonzero(sens >= target)
        return float(candidates[reaching.max()]) if reaching.size else float(candidates.min())
    score = sens + spec
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def _fit_multilabel(
    probabilities: np.ndarray, labels: np.ndarray, task: Task, criterion: Criterion
) -> OperatingPoint:
    targets = dict(criterion.targets)
    thresholds = tuple(
        _fit_threshold(probabilities[:, k], labels[:, k], targets.get(name))
        for k, name in enumerate(task.classes)
    )
    point = OperatingPoint(
        str(criterion), task.kind, tuple(task.classes), thresholds=thresholds, fitted_on_images=len(labels)
    )
    return point


def fit_operating_point(
    probabilities: np.ndarray, labels: np.ndarray, task: Task, criterion: Criterion
) -> OperatingPoint:
    """Fit the site's decision rule on its validation split's model outputs and labels (``[N, C]`` each).

    With no validation images, the ``argmax`` criterion, or (multi-class) a validation split of
    one class, the model's own rule: on one class, balanced accuracy is that class's sensitivity,
    and a search would shift the decisions towards it until every image is called that class
    (the real-data study's COVID-19-only sites did: specificity 0.15-0.23)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if criterion.name == "argmax" or len(labels) == 0:
        return OperatingPoint.argmax(task)
    if not task.is_multilabel and len(np.unique(np.argmax(labels, axis=1))) < 2:
        return OperatingPoint.argmax(task)  # one class only: any search would just favour it
    if task.is_multilabel:
        return _fit_multilabel(probabilities, labels, task, criterion)
    return _fit_multiclass(probabilities, labels, task, criterion)


def metrics_at(
    point: OperatingPoint, probabilities: np.ndarray, labels: np.ndarray, task: Task
) -> dict[str, float]:
    """``balanced_accuracy``, ``sensitivity/<c>``, ``specificity/<c>`` and ``never_predicted`` (classes
    present in ``labels`` that the rule never chooses) of the decisions at ``point``.

    Per-class values are NaN where the class has no positive (or negative) image."""
    decided = point.decide(probabilities)
    labels = np.asarray(labels, dtype=np.float64)
    out: dict[str, float] = {}
    sens: list[float] = []
    never = 0
    for k, name in enumerate(task.classes):
        if task.is_multilabel:
            known = ~np.isnan(labels[:, k])
            truth, guess = labels[known, k] > 0.5, decided[known, k] == 1
        else:
            truth, guess = labels[:, k] > 0.5, decided == k
        s = float(np.mean(guess[truth])) if truth.any() else math.nan
        sp = float(np.mean(~guess[~truth])) if (~truth).any() else math.nan
        out[f"sensitivity/{name}"], out[f"specificity/{name}"] = s, sp
        if truth.any():
            never += int(not guess.any())
            sens.append(s if not task.is_multilabel else (s + sp) / 2 if not math.isnan(sp) else s)
    out["balanced_accuracy"] = float(np.mean(sens)) if sens else math.nan
    out["never_predicted"] = float(never)
    return out
