"""A site's validation of a trained model on its own labelled images (``cxr-fl-client evaluate``).

Before a hospital deploys a student it scores it on data of its own. This module owns that,
from files to report:

1. :func:`load_scoring_model` opens the model: an exported ONNX file (with the
   ``<name>.preprocessing.json`` written beside it), a ``.pt`` with its ``<file>.json``
   metadata (``student.pt``, ``teacher.pt`` of the site export), a site's ``student/`` folder,
   or a coordinator's checkpoint (``RUN_DIR/checkpoints/best.pt``, ``last.pt``, ``student.pt``),
   whose architecture is read from ``RUN_DIR/run_config.json``. The model fixes the task, the
   classes and the image size.
2. :func:`load_labelled_images` reads the data through the same source adapters and the same
   decode-once image cache as training (any registered ``--format``), mapping its labels onto
   the model's task; :func:`score_images` normalises exactly as training did
   (:func:`common.data.dataset.normalise`) and returns probabilities (softmax, or sigmoid per
   finding).
3. :func:`evaluate_scores` computes, with scikit-learn for the point estimates and
   :mod:`common.bootstrap` for the intervals: AUROC per class (one-vs-rest) or finding and
   their macro mean with stratified bootstrap percentile intervals; sensitivity, specificity
   and balanced accuracy at the model's own rule (argmax for multi-class, 0.5 per finding for
   multi-label) and at the site's: the operating point the model carries
   (common/operating_point.py, fitted on the site's validation split), or thresholds the site
   chooses on the command line, which replace it; calibration (expected
   calibration error over equal-width bins, top-label for multi-class, per finding for
   multi-label); confusion matrices.
4. :func:`write_report` writes ``evaluation.json``, ``evaluation.md``, ``roc_curves.png``,
   ``reliability.png`` and ``confusion_matrix.png`` (each file atomically).

No Flower imports; nothing leaves the machine. The report holds aggregate figures only, no
per-image row.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.bootstrap import (
    Interval,
    nanmean_rows,
    percentile_interval,
    stratified_weights,
    weighted_auroc,
    weighted_rate,
)
from common.checkpoint import load_metadata, sha256_file
from common.data.cache import CachedImages, ProgressCallback, build_cache
from common.errors import ConfigError, CxrFlError, DataError, ModelError
from common.jsonio import json_safe, write_json, write_text_atomic
from common.markdown import table_lines
from common.metrics import Metrics, binary_counts, compute_metrics, nanmean, ratio
from common.operating_point import OperatingPoint
from common.run_layout import checkpoint_run_config
from common.tasks import Task, get_task

logger = logging.getLogger(__name__)

REPORT_FILES = (
    "evaluation.json",
    "evaluation.md",
    "roc_curves.png",
    "reliability.png",
    "confusion_matrix.png",
)
SCORE_BATCH_SIZE = 64
ScoreProgress = Callable[[int, int], None]
"""``progress(done, total)`` after each batch of scored images."""


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ScoringModel:
    """A model ready to score preprocessed images: ``predict([N, C, S, S]) -> [N, classes]``."""

    path: Path
    kind: str
    """``onnx`` or ``torch``."""
    role: str
    task: Task
    image_size: int
    in_channels: int
    predict: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    equalize: bool = False
    """Histogram-equalise images before normalising (the model was trained so)."""
    operating_point: OperatingPoint | None = None
    """The site's decision rule the model carries (None: its own argmax / 0.5)."""

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": sha256_file(self.path),
            "kind": self.kind,
            "role": self.role,
            "task": self.task.name,
            "task_kind": self.task.kind,
            "classes": list(self.task.classes),
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "equalize": self.equalize,
            "operating_point": self.operating_point.describe() if self.operating_point else None,
        }


def _torch_scorer(model: Any, task: Task, image_size: int, in_channels: int) -> Callable[[np.ndarray], Any]:
    import torch

    from common.export import Preprocessing

    prep = Preprocessing.for_task(task, image_size, in_channels)
    model.eval()

    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.as_tensor(np.ascontiguousarray(images, dtype=np.float32))).float().numpy()
        return prep.probabilities(logits)

    return predict


def _coordinator_checkpoint(weights: Path, meta: Mapping[str, Any] | None) -> ScoringModel | None:
    """A checkpoint of a coordinator's run folder, rebuilt from the folder's run_config.json."""
    run_config_path = checkpoint_run_config(weights)
    if run_config_path is None:
        return None
    from common.checkpoint import load_model_state
    from common.local import build_loaded_model, student_config
    from common.run_settings import run_settings_from_config

    try:
        run_config = json.loads(run_config_path.read_text(encoding="utf-8"))
        settings = run_settings_from_config(run_config)
    except (OSError, json.JSONDecodeError, CxrFlError) as exc:
        raise ModelError(
            f"cannot read the run settings '{run_config_path}' of checkpoint '{weights}': {exc}"
        ) from None
    student = (meta or {}).get("role") == "global student"
    config = (
        student_config(settings.distill, settings.teacher, settings.teacher.norm)
        if student
        else settings.teacher
    )
    try:
        model = build_loaded_model(config, settings.task, load_model_state(weights))
    except RuntimeError as exc:
        raise ModelError(
            f"checkpoint '{weights}' does not fit the model described in '{run_config_path}': {exc}"
        ) from None
    size = settings.run.image_size
    return ScoringModel(
        weights,
        "torch",
        "global student" if student else "global teacher",
        settings.task,
        size,
        config.in_channels,
        _torch_scorer(model, settings.task, size, config.in_channels),
        settings.run.preprocess_equalize,
    )


def load_scoring_model(path: Path, *, num_threads: int = 2) -> ScoringModel:
    """Open an exported ONNX model, a ``.pt`` with metadata, a student folder or a server checkpoint.

    Raises ModelError (file missing, metadata missing, files that do not belong together).
    """
    from common.export import MODEL_METADATA_FORMAT, WEIGHTS_NAME, OnnxPredictor, load_torch_model

    path = Path(path)
    if not path.exists():
        raise ModelError(
            f"model '{path}' not found; give an exported .onnx file, a .pt with its .json beside it, "
            "or a site's student folder"
        )
    if path.is_dir() and (path / "student.onnx").is_file():
        path = path / "student.onnx"
    if path.suffix.lower() == ".onnx":
        predictor = OnnxPredictor(path, num_threads=num_threads)
        prep = predictor.preprocessing
        task = get_task(prep.task)
        if tuple(prep.classes) != tuple(task.classes):
            raise ModelError(
                f"preprocessing file of '{path}' lists classes {', '.join(prep.classes)} but task "
                f"'{task.name}' has {', '.join(task.classes)}; re-export the model"
            )
        return ScoringModel(
            path,
            "onnx",
            "exported model",
            task,
            prep.image_size,
            prep.in_channels,
            predictor.predict_arrays,
            prep.equalize,
            prep.operating_point,
        )
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise ModelError(
            f"no model at '{path}': give an exported .onnx file, a .pt with its .json beside it, or a "
            f"folder holding student.onnx or {WEIGHTS_NAME}"
        )
    try:
        meta = load_metadata(weights)
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"metadata '{weights.name}.json' beside '{weights}' is not valid JSON: {exc}"
        ) from None
    if meta is None or meta.get("format") != MODEL_METADATA_FORMAT:
        checkpoint = _coordinator_checkpoint(weights, meta)
        if checkpoint is not None:
            return checkpoint
    loaded = load_torch_model(weights)  # ModelError naming the missing metadata
    role = str((meta or {}).get("role", "model"))
    return ScoringModel(
        loaded.path,
        "torch",
        role,
        loaded.task,
        loaded.image_size,
        loaded.config.in_channels,
        _torch_scorer(loaded.model, loaded.task, loaded.image_size, loaded.config.in_channels),
        loaded.equalize,
        loaded.operating_point,
    )


# ----------------------------------------------------------------------------- the data


def load_labelled_images(
    fmt: str,
    data: Path | None,
    task: Task,
    image_size: int,
    *,
    cache_dir: Path | None = None,
    options: Mapping[str, object] | None = None,
    strict: bool = False,
    progress: ProgressCallback | None = None,
) -> CachedImages:
    """The site's images decoded and resized like training (the shared cache), labelled for ``task``.

    Raises DataError when the data's labels do not fit the model's task, when no image is
    readable, or when no image has a known label.
    """
    from common.data.sources import load_catalog

    try:
        catalog = load_catalog(fmt, data, task, options=options, strict=strict)
    except DataError as exc:
        raise DataError(
            f"{exc} (the model was trained for task '{task.name}': {', '.join(task.classes)}; "
            "evaluate it on data labelled for that task)"
        ) from None
    cached = build_cache(catalog, image_size, cache_dir, strict=strict, progress=progress)
    if strict and cached.skipped:  # a cache built earlier without --strict records its skips
        bad = cached.skipped[0]
        raise DataError(f"unreadable image {bad.key}: {bad.reason}")
    if len(cached) == 0:
        first = cached.skipped[0] if cached.skipped else None
        why = f" (first: {first.key}: {first.reason})" if first else ""
        raise DataError(f"none of the {len(catalog)} image(s) under '{data}' could be read{why}")
    targets = cached.catalog.targets
    if not np.isfinite(targets).any():
        raise DataError(
            f"no image under '{data}' has a known label for task '{task.name}'; "
            "evaluation needs labelled data"
        )
    if cached.skipped:
        logger.warning(
            "%d unreadable image(s) left out of the evaluation (first: %s)",
            len(cached.skipped),
            cached.skipped[0].key,
        )
    return cached


def score_images(
    model: ScoringModel,
    images: np.ndarray,
    *,
    batch_size: int = SCORE_BATCH_SIZE,
    progress: ScoreProgress | None = None,
) -> np.ndarray:
    """Probabilities ``[N, classes]`` of uint8 ``images`` ``[N, S, S]`` (normalised as in training)."""
    from common.data.dataset import normalise
    from common.data.preprocess import equalize_images

    if images.ndim != 3 or images.shape[1:] != (model.image_size, model.image_size):
        raise DataError(
            f"images have shape {images.shape[1:]}; the model needs {model.image_size} x {model.image_size}"
        )
    total = len(images)
    outputs = []
    for start in range(0, total, batch_size):
        pixels = np.array(images[start : start + batch_size])
        if model.equalize:  # as the model was trained (preprocess-equalize)
            pixels = equalize_images(pixels)
        batch = normalise(pixels).unsqueeze(1).numpy()
        if model.in_channels != 1:
            batch = np.repeat(batch, model.in_channels, axis=1)
        outputs.append(np.asarray(model.predict(batch), dtype=np.float64))
        if progress is not None:
            progress(min(start + batch_size, total), total)
    return np.concatenate(outputs) if outputs else np.zeros((0, model.task.num_classes))


# ----------------------------------------------------------------------------- the statistics


@dataclass(frozen=True)
class EvaluationSettings:
    """How the evaluation is computed. ``thresholds`` are the site's chosen per-class thresholds;
    without any, ``operating_point`` (the site's rule the model carries) gives the site's decisions."""

    n_bootstrap: int = 1000
    seed: int = 0
    level: float = 0.95
    calibration_bins: int = 10
    thresholds: Mapping[str, float] | None = None
    operating_point: OperatingPoint | None = None

    def __post_init__(self) -> None:
        if self.n_bootstrap < 1:
            raise ConfigError("bootstrap", self.n_bootstrap, "an integer >= 1 (number of resamples)")
        if not 0.0 < self.level < 1.0:
            raise ConfigError("confidence level", self.level, "a number between 0 and 1")
        if self.calibration_bins < 2:
            raise ConfigError("bins", self.calibration_bins, "an integer >= 2")
        for name, value in (self.thresholds or {}).items():
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ConfigError(f"threshold of '{name}'", value, "a probability between 0 and 1")


def parse_thresholds(
    task: Task, default: float | None, per_class: Mapping[str, float]
) -> dict[str, float] | None:
    """Per-class thresholds from ``--threshold`` (every class) and ``--class-threshold`` (one class)."""
    if default is None and not per_class:
        return None
    out: dict[str, float] = {}
    for name in per_class:
        task.index(name)  # ConfigError listing the task's classes
    for name in task.classes:
        value = per_class.get(name, default)
        if value is not None:
            out[name] = float(value)
    return out


@dataclass(frozen=True)
class ClassResult:
    """One class (multi-class, one-vs-rest) or finding (multi-label)."""

    name: str
    positives: int
    negatives: int
    auroc: Interval
    sensitivity: Interval
    specificity: Interval
    ece: float
    site_threshold: float | None = None
    site_log_prior_shift: float | None = None
    site_sensitivity: Interval | None = None
    site_specificity: Interval | None = None
    site_confusion: list[list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "positives": self.positives,
            "negatives": self.negatives,
            "auroc": self.auroc.to_dict(),
            "sensitivity": self.sensitivity.to_dict(),
            "specificity": self.specificity.to_dict(),
            "ece": self.ece,
        }
        if self.site_sensitivity is not None:
            out["site_operating_point"] = {
                "threshold": self.site_threshold,
                "log_prior_shift": self.site_log_prior_shift,
                "sensitivity": self.site_sensitivity.to_dict() if self.site_sensitivity else None,
                "specificity": self.site_specificity.to_dict() if self.site_specificity else None,
                "confusion": self.site_confusion,
            }
        return out


@dataclass(frozen=True)
class CalibrationBins:
    """Reliability-diagram data of one curve: per non-empty bin, mean confidence and observed rate."""

    label: str
    confidence: list[float]
    observed: list[float]
    counts: list[int]


@dataclass(frozen=True)
class EvaluationResult:
    """Everything :func:`write_report` needs (no per-image values apart from ``roc``'s curves)."""

    task: Task
    n_images: int
    operating_point: str
    classes: tuple[ClassResult, ...]
    auroc_macro: Interval
    balanced_accuracy: Interval
    accuracy: float
    ece: float
    ece_kind: str
    confusion: list[Any]
    site_balanced_accuracy: Interval | None
    calibration: tuple[CalibrationBins, ...]
    roc: tuple[tuple[str, list[float], list[float]], ...]
    settings: EvaluationSettings
    notes: tuple[str, ...] = ()
    site_rule: str = ""
    """How the site's decisions were taken (its thresholds, or its operating point in one line)."""
    site_values: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """``{"thresholds": {class: t}}`` or ``{"log_prior_shift": {class: b}}`` of the site's rule."""

    def to_dict(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "task": self.task.name,
            "task_kind": self.task.kind,
            "n_images": self.n_images,
            "operating_point": self.operating_point,
            "auroc_macro": self.auroc_macro.to_dict(),
            "balanced_accuracy": self.balanced_accuracy.to_dict(),
            "accuracy": self.accuracy,
            "calibration": {
                "ece": self.ece,
                "kind": self.ece_kind,
                "bins": settings.calibration_bins,
            },
            "confusion": self.confusion,
            "site_operating_point": None
            if self.site_balanced_accuracy is None
            else {
                "rule": self.site_rule,
                "thresholds": dict(self.site_values.get("thresholds", {})),
                **{k: dict(v) for k, v in self.site_values.items() if k != "thresholds"},
                "balanced_accuracy": self.site_balanced_accuracy.to_dict(),
            },
            "classes": [c.to_dict() for c in self.classes],
            "bootstrap": {
                "resamples": settings.n_bootstrap,
                "seed": settings.seed,
                "level": settings.level,
                "method": "percentile",
                "stratified_by": "true class"
                if self.task.kind == "multiclass"
                else "first positive finding (or none)",
            },
            "notes": list(self.notes),
        }


def _ece(confidence: np.ndarray, outcome: np.ndarray, bins: int) -> tuple[float, CalibrationBins]:
    """Expected calibration error over ``bins`` equal-width bins, and the diagram's points."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    hit_sum = np.bincount(which, weights=outcome.astype(np.float64), minlength=bins)
    used = counts > 0
    mean_conf = conf_sum[used] / counts[used]
    observed = hit_sum[used] / counts[used]
    total = counts.sum()
    ece = float(np.sum(counts[used] / total * np.abs(observed - mean_conf))) if total else math.nan
    return ece, CalibrationBins("", mean_conf.tolist(), observed.tolist(), counts[used].astype(int).tolist())


@dataclass
class _PerClass:
    """Each class's result, bootstrap samples, ROC curve and calibration bins."""

    results: list[ClassResult] = field(default_factory=list)
    auroc: list[np.ndarray] = field(default_factory=list)
    sensitivity: list[np.ndarray] = field(default_factory=list)
    specificity: list[np.ndarray] = field(default_factory=list)
    site_sensitivity: list[np.ndarray] = field(default_factory=list)
    site_specificity: list[np.ndarray] = field(default_factory=list)
    roc: list[tuple[str, list[float], list[float]]] = field(default_factory=list)
    calibration: list[CalibrationBins] = field(default_factory=list)


def _decisions(
    task: Task, targets: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, str]:
    """The true class (multi-class), the bootstrap strata, the default decisions and their name:
    argmax for multi-class; threshold 0.5 per finding for multi-label, stratified by first finding."""
    if task.kind == "multiclass":
        truth = targets.argmax(axis=1)
        predicted = np.zeros_like(labels)
        predicted[np.arange(len(scores)), scores.argmax(axis=1)] = True
        return truth, truth, predicted, "argmax"
    has_positive = labels.any(axis=1)
    strata = np.where(has_positive, labels.argmax(axis=1), task.num_classes)
    return None, strata, scores >= 0.5, "threshold 0.5"


def _per_class(
    task: Task,
    point: Metrics,
    labels: np.ndarray,
    known: np.ndarray,
    scores: np.ndarray,
    predicted: np.ndarray,
    weights: np.ndarray,
    rule: SiteRule | None,
    settings: EvaluationSettings,
) -> _PerClass:
    """Every class's figures with bootstrap intervals (unknown labels left out per class)."""
    from sklearn.metrics import roc_curve

    multiclass = task.kind == "multiclass"
    level = settings.level
    out = _PerClass()
    for k, name in enumerate(task.classes):
        mask = known[:, k]
        y = labels[:, k]
        s = scores[:, k]
        auc_b = weighted_auroc(y[mask], s[mask], weights if mask.all() else weights[:, mask])
        sens_b = weighted_rate(predicted[:, k], y & mask, weights)
        spec_b = weighted_rate(~predicted[:, k], ~y & mask, weights)
        out.auroc.append(auc_b)
        out.sensitivity.append(sens_b)
        out.specificity.append(spec_b)
        ece_k, bins_k = _ece(s[mask], y[mask], settings.calibration_bins)
        if not multiclass:
            out.calibration.append(CalibrationBins(name, bins_k.confidence, bins_k.observed, bins_k.counts))
        if 0 < y[mask].sum() < mask.sum():
            fpr, tpr, _ = roc_curve(y[mask].astype(int), s[mask])
            out.roc.append((name, fpr.tolist(), tpr.tolist()))
        site: dict[str, Any] = {}
        chosen = rule.chosen[k] if rule is not None else None
        if rule is not None and chosen is not None:
            site, site_sens, site_spec = _site_class(rule, name, chosen, y & mask, ~y & mask, weights, level)
            out.site_sensitivity.append(site_sens)
            out.site_specificity.append(site_spec)
        out.results.append(
            ClassResult(
                name=name,
                positives=int(np.sum(y & mask)),
                negatives=int(np.sum(~y & mask)),
                auroc=percentile_interval(point.auroc[k], auc_b, level),
                sensitivity=percentile_interval(point.sensitivity[k], sens_b, level),
                specificity=percentile_interval(point.specificity[k], spec_b, level),
                ece=ece_k,
                **site,
            )
        )
    return out


def evaluate_scores(
    task: Task, targets: np.ndarray, scores: np.ndarray, settings: EvaluationSettings | None = None
) -> EvaluationResult:
    """All figures of the report from labels ``[N, C]`` and probabilities ``[N, C]``.

    Multi-class targets are one-hot; multi-label ones 1 / 0 / NaN (unknown labels are left out
    per finding). Raises DataError when shapes or labels do not fit the task.
    """
    settings = settings or EvaluationSettings()
    point = compute_metrics(task, targets, scores, threshold=0.5)  # validates shapes and labels
    targets = np.asarray(targets, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    multiclass = task.kind == "multiclass"
    known = ~np.isnan(targets)
    labels = np.nan_to_num(targets, nan=0.0) > 0.5
    truth, strata, predicted, operating_point = _decisions(task, targets, labels, scores)
    weights = stratified_weights(strata, settings.n_bootstrap, settings.seed)
    level = settings.level
    rule = site_rule(task, scores, settings)
    per_class = _per_class(task, point, labels, known, scores, predicted, weights, rule, settings)
    class_results, calibration = per_class.results, per_class.calibration
    auroc_samples, sens_samples, spec_samples = per_class.auroc, per_class.sensitivity, per_class.specificity
    defined = [k for k in range(task.num_classes) if math.isfinite(point.auroc[k])]
    macro_b = nanmean_rows([auroc_samples[k] for k in defined], settings.n_bootstrap)
    if multiclass:
        present = [k for k in range(task.num_classes) if labels[:, k].any()]
        balanced_b = nanmean_rows([sens_samples[k] for k in present], settings.n_bootstrap)
        confidence = scores.max(axis=1)
        correct = scores.argmax(axis=1) == truth
        ece, top = _ece(confidence, correct, settings.calibration_bins)
        calibration.insert(0, CalibrationBins("top label", top.confidence, top.observed, top.counts))
        ece_kind = "top-label (confidence of the predicted class vs accuracy)"
    else:
        balanced_b = nanmean_rows(
            [(a + b) / 2 for a, b in zip(sens_samples, spec_samples, strict=True)], settings.n_bootstrap
        )
        ece = nanmean([c.ece for c in class_results])
        ece_kind = "mean over findings of each finding's ECE (probability vs observed rate)"
    site_balanced: Interval | None = None
    if rule is not None:
        site_balanced = _site_balanced(
            rule, class_results, per_class.site_sensitivity, per_class.site_specificity, settings
        )
    return EvaluationResult(
        task=task,
        n_images=len(scores),
        operating_point=operating_point,
        classes=tuple(class_results),
        auroc_macro=percentile_interval(point.auroc_macro, macro_b, level),
        balanced_accuracy=percentile_interval(point.balanced_accuracy, balanced_b, level),
        accuracy=point.accuracy,
        ece=ece,
        ece_kind=ece_kind,
        confusion=point.confusion,
        site_balanced_accuracy=site_balanced,
        calibration=tuple(calibration),
        roc=tuple(per_class.roc),
        settings=settings,
        notes=point.notes,
        site_rule=rule.description if rule else "",
        site_values=rule.values if rule else {},
    )


@dataclass(frozen=True)
class SiteRule:
    """The site's decisions on the evaluated images, per class (None: no decision of the site's)."""

    description: str
    chosen: list[np.ndarray | None]
    values: dict[str, dict[str, float]]
    mean_recall: bool
    """Balanced accuracy as the mean sensitivity over classes (one decision per image), else as
    the mean of (sensitivity + specificity) / 2 per class or finding."""


def site_rule(task: Task, scores: np.ndarray, settings: EvaluationSettings) -> SiteRule | None:
    """The site's thresholds (``--threshold``/``--class-threshold``: they replace the operating
    point), else the operating point the model carries; None when the site has neither."""
    thresholds = settings.thresholds or {}
    if thresholds:
        chosen = [
            scores[:, k] >= thresholds[c] if c in thresholds else None for k, c in enumerate(task.classes)
        ]
        return SiteRule("site's thresholds", chosen, {"thresholds": dict(thresholds)}, mean_recall=False)
    point = settings.operating_point
    if point is None or point.is_model_rule:
        return None
    if point.classes != tuple(task.classes) or point.task_kind != task.kind:
        raise ModelError(
            f"the model's operating point is for classes {', '.join(point.classes)}, not its task's"
        )
    decided = point.decide(scores)
    if task.is_multilabel:
        picks: list[np.ndarray | None] = [decided[:, k] == 1 for k in range(task.num_classes)]
        values = {"thresholds": dict(zip(task.classes, point.thresholds, strict=True))}
    else:
        picks = [decided == k for k in range(task.num_classes)]
        values = {"log_prior_shift": dict(zip(task.classes, point.log_prior_shift, strict=True))}
    return SiteRule(f"site's operating point: {point.describe()}", picks, values, not task.is_multilabel)


def _site_class(
    rule: SiteRule,
    name: str,
    chosen: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray,
    weights: np.ndarray,
    level: float,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One class's figures at the site's decisions, and their bootstrap samples."""
    sens_b = weighted_rate(chosen, positive, weights)
    spec_b = weighted_rate(~chosen, negative, weights)
    tn, fp, fn, tp = binary_counts(chosen, positive, negative)
    figures = {
        "site_threshold": rule.values.get("thresholds", {}).get(name),
        "site_log_prior_shift": rule.values.get("log_prior_shift", {}).get(name),
        "site_sensitivity": percentile_interval(ratio(tp, tp + fn), sens_b, level),
        "site_specificity": percentile_interval(ratio(tn, tn + fp), spec_b, level),
        "site_confusion": [[tn, fp], [fn, tp]],
    }
    return figures, sens_b, spec_b


def _site_balanced(
    rule: SiteRule,
    classes: list[ClassResult],
    sens_samples: list[np.ndarray],
    spec_samples: list[np.ndarray],
    settings: EvaluationSettings,
) -> Interval:
    """Balanced accuracy at the site's decisions (see :attr:`SiteRule.mean_recall`), with its interval."""
    pairs = [
        (c.site_sensitivity.value, c.site_specificity.value)
        for c in classes
        if c.site_sensitivity is not None and c.site_specificity is not None
    ]
    if rule.mean_recall:
        values, rows = [sens for sens, _ in pairs], sens_samples
    else:
        values = [(sens + spec) / 2 for sens, spec in pairs]
        rows = [(a + b) / 2 for a, b in zip(sens_samples, spec_samples, strict=True)]
    samples = nanmean_rows(rows, settings.n_bootstrap)
    return percentile_interval(nanmean(values), samples, settings.level)


# ----------------------------------------------------------------------------- the report


def format_value(value: float) -> str:
    """Three decimals, or ``n/a`` for an undefined value."""
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def format_interval(interval: Interval | None) -> str:
    """``0.912 (0.880-0.941)``, the value alone without an interval, or ``n/a``."""
    if interval is None or not math.isfinite(interval.value):
        return "n/a"
    if not math.isfinite(interval.low):
        return f"{interval.value:.3f}"
    return f"{interval.value:.3f} ({interval.low:.3f}-{interval.high:.3f})"


def _markdown(report: Mapping[str, Any], result: EvaluationResult) -> str:
    model, data = report["model"], report["data"]
    ci = format_interval
    level = f"{result.settings.level:.0%}"
    unit = "finding" if result.task.kind == "multilabel" else "class"
    lines = [
        f"# Site evaluation: {Path(model['path']).name} on {data['format']} data",
        "",
        f"Model: `{model['path']}` ({model['kind']}, {model['role']}; sha256 `{model['sha256'][:16]}...`), "
        f"task `{result.task.name}` ({result.task.kind}), {model['image_size']} px.",
        f"Data: `{data['path']}` (format `{data['format']}`): {result.n_images} images evaluated, "
        f"{data['unreadable']} unreadable left out.",
        f"Intervals: {level} stratified bootstrap percentile intervals, "
        f"{result.settings.n_bootstrap} resamples, "
        f"seed {result.settings.seed}.",
        "",
        "## Summary",
        "",
    ]
    summary = [
        ["macro AUROC", ci(result.auroc_macro)],
        [f"balanced accuracy ({result.operating_point})", ci(result.balanced_accuracy)],
        ["accuracy", format_value(result.accuracy)],
        [
            f"expected calibration error ({result.settings.calibration_bins} bins, {result.ece_kind})",
            format_value(result.ece),
        ],
    ]
    if result.site_balanced_accuracy is not None:
        summary.append([f"balanced accuracy ({_site_label(result)})", ci(result.site_balanced_accuracy)])
    lines += table_lines(["metric", "value"], summary)
    lines += ["", f"## Per {unit} (operating point: {result.operating_point})", ""]
    lines += table_lines(
        [unit, "positives", "negatives", "AUROC", "sensitivity", "specificity", "ECE"],
        [
            [
                c.name,
                c.positives,
                c.negatives,
                ci(c.auroc),
                ci(c.sensitivity),
                ci(c.specificity),
                format_value(c.ece),
            ]
            for c in result.classes
        ],
        align="lrrlllr",
    )
    lines += _markdown_site(result, unit)
    lines += [
        "",
        "## Figures",
        "",
        "![ROC curves](roc_curves.png)",
        "",
        "![Reliability diagram](reliability.png)",
        "",
        "![Confusion matrix](confusion_matrix.png)",
    ]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    lines += [
        "",
        "Sensitivity and specificity are one-vs-rest per class; AUROC is undefined (n/a) for a "
        f"{unit} without positive or without negative images.",
    ]
    return "\n".join(lines) + "\n"


def _site_label(result: EvaluationResult) -> str:
    return "site thresholds" if result.settings.thresholds else "site operating point"


def _markdown_site(result: EvaluationResult, unit: str) -> list[str]:
    """The report's section on the site's decisions (its thresholds, or its operating point)."""
    if result.site_balanced_accuracy is None:
        return []
    ci = format_interval
    shifts = "log_prior_shift" in result.site_values
    title = "Site-chosen thresholds" if result.settings.thresholds else "Site operating point"
    lines = [
        "",
        f"## {title}",
        "",
        f"Decisions at the {result.site_rule}.",
        "",
    ]
    rows = []
    for c in result.classes:
        value = c.site_log_prior_shift if shifts else c.site_threshold
        if value is None or c.site_confusion is None:
            continue
        (tn, fp), (fn, tp) = c.site_confusion
        shown = f"{value:+.2f}" if shifts else f"{value:g}"
        rows.append(
            [c.name, shown, ci(c.site_sensitivity), ci(c.site_specificity), f"{tn} / {fp} / {fn} / {tp}"]
        )
    header = [
        unit,
        "log-prior shift" if shifts else "threshold",
        "sensitivity",
        "specificity",
        "TN / FP / FN / TP",
    ]
    return lines + table_lines(header, rows, align="lr")


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_roc(result: EvaluationResult, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    by_name = {c.name: c for c in result.classes}
    for name, fpr, tpr in result.roc:
        ax.plot(fpr, tpr, label=f"{name}: AUROC {format_interval(by_name[name].auroc)}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(f"ROC curves (macro AUROC {format_interval(result.auroc_macro)})", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_reliability(result: EvaluationResult, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    for curve in result.calibration:
        ax.plot(curve.confidence, curve.observed, marker="o", markersize=3, label=curve.label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    what = "accuracy" if result.task.kind == "multiclass" else "observed positive rate"
    ax.set_xlabel("mean predicted probability in bin")
    ax.set_ylabel(what)
    ax.set_title(
        f"Reliability diagram (ECE {format_value(result.ece)}, {result.settings.calibration_bins} bins)",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_confusion(result: EvaluationResult, path: Path) -> None:
    plt = _pyplot()
    names = [c.name for c in result.classes]
    if result.task.kind == "multiclass":
        matrix = np.asarray(result.confusion, dtype=int)
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 1.1 * len(names) + 2.5))
        _draw_matrix(ax, matrix, names, names)
        ax.set_xlabel("predicted (argmax)")
        ax.set_ylabel("true")
        ax.set_title("Confusion matrix", fontsize=10)
    else:
        cols = min(4, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
        for k, ax in enumerate(axes.ravel()):
            if k >= len(names):
                ax.axis("off")
                continue
            _draw_matrix(ax, np.asarray(result.confusion[k], dtype=int), ["neg", "pos"], ["neg", "pos"])
            ax.set_title(names[k], fontsize=9)
        fig.suptitle(
            "Confusion matrices per finding (threshold 0.5; rows true, columns predicted)", fontsize=10
        )
    fig.tight_layout()
    _save_figure(fig, path)


def _draw_matrix(ax: Any, matrix: np.ndarray, rows: list[str], cols: list[str]) -> None:
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    high = matrix.max() if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if high and matrix[i, j] > high / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=colour, fontsize=8)


def write_report(
    result: EvaluationResult,
    out: Path,
    *,
    model: Mapping[str, Any],
    data: Mapping[str, Any],
) -> dict[str, Any]:
    """Write the JSON and markdown report and the three figures into ``out``; return the JSON."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "format": "cxr-fl-site-evaluation-v1",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": dict(model),
        "data": dict(data),
        "results": result.to_dict(),
        "files": list(REPORT_FILES),
    }
    _plot_roc(result, out / "roc_curves.png")
    _plot_reliability(result, out / "reliability.png")
    _plot_confusion(result, out / "confusion_matrix.png")
    write_text_atomic(out / "evaluation.md", _markdown(report, result))
    write_json(out / "evaluation.json", report)
    return json_safe(report)
