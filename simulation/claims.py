"""The three claims a simulated federation's report opens with, each held or not, with a 95%
bootstrap interval (common/bootstrap.py).

* **teacher vs pooled**: on the pooled test set, the federated teacher's macro-AUROC is at least
  :data:`AUROC_RATIO` of the pooled teacher's, and its balanced accuracy at the sites' operating
  points at least :data:`BALANCED_RATIO` of it. Both teachers score the same images
  (``baselines_scores.npz``), so the interval is a paired bootstrap of the images, stratified by
  site and class.
* **students vs teacher**: the delivered students against the teacher at each site, in
  macro-AUROC and in balanced accuracy at the site's operating point: mean difference over the
  sites no lower than -:data:`MEAN_MARGIN`, and no site more than :data:`SITE_MARGIN` below.
  Every site counts: a failed site, or one without figures, is a miss.
* **KD vs no KD**: the KD student against the student trained without KD at each site; held when
  the mean difference is above 0 in both figures (a site without them is a miss there too).

For the last two, a simulation keeps every site's models on this machine: ``site_scores.npz``
(simulation/site_scores.py) has their per-image test scores, and the interval resamples each
site's test images (paired: both models score the same images) wherever that rescoring
reproduces the figures the sites sent; otherwise (a deployed federation's figures, an older run)
it resamples the sites, and says so. "Held" is the point estimate meeting the target; the
interval says how far the data support it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.bootstrap import Interval, percentile_interval, stratified_weights
from common.tasks import Task
from server.delivery_check import figure
from simulation.site_decisions import balanced_accuracy, macro_auroc

AUROC_RATIO = 0.97
BALANCED_RATIO = 0.90
MEAN_MARGIN = 0.02
SITE_MARGIN = 0.05
RESAMPLES = 1000
SEED = 0
OP_NAME = "balanced accuracy at the operating point"
IMAGES = " over the test images"


@dataclass(frozen=True)
class Claim:
    """One claim of the report: ``held`` None when it could not be measured."""

    name: str
    held: bool | None
    sentence: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "held": self.held, "sentence": self.sentence, "figures": self.figures}


def _verdict(held: bool | None) -> str:
    return {True: "**held**", False: "**not held**", None: "**not measured**"}[held]


def _ci(interval: Interval, over: str = "") -> str:
    if not math.isfinite(interval.low):
        return "no interval"
    return f"95% CI {interval.low:.3f} to {interval.high:.3f}{over}"


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), math.nan)


def _strata(labels: np.ndarray, site: np.ndarray, task: Task) -> np.ndarray:
    if task.is_multilabel:
        return np.asarray(site)
    return np.asarray(site) * task.num_classes + np.argmax(labels, axis=1)


@dataclass(frozen=True)
class Ratio:
    """Federated and pooled figures on the pooled test set, and federated / pooled with its interval."""

    federated: float
    pooled: float
    ratio: Interval

    def to_dict(self) -> dict[str, Any]:
        return {"federated": self.federated, "pooled": self.pooled, **self.ratio.to_dict()}


def teacher_ratios(scores: Mapping[str, np.ndarray], task: Task) -> dict[str, Ratio]:
    """Federated / pooled ratios of macro-AUROC and of balanced accuracy at the sites' operating
    points on the pooled test set, with paired image-bootstrap intervals."""
    labels, site = np.asarray(scores["labels"]), np.asarray(scores["site"])
    weights = stratified_weights(_strata(labels, site, task), RESAMPLES, SEED)
    out = {}
    for key, statistic in (
        ("auroc_macro", lambda name, w: macro_auroc(scores[f"{name}_probabilities"], labels, w)),
        (
            "op_balanced_accuracy",
            lambda name, w: balanced_accuracy(scores[f"{name}_decisions"], labels, task, w),
        ),
    ):
        federated, pooled = float(statistic("federated", None)[0]), float(statistic("pooled", None)[0])
        resampled = _ratio(statistic("federated", weights), statistic("pooled", weights))
        point = federated / pooled if pooled > 0 else math.nan
        out[key] = Ratio(federated, pooled, percentile_interval(point, resampled))
    return out


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _baseline_ratio(baselines: Mapping[str, Any], key: str) -> Ratio:
    """The ratio of baselines.json's pooled test figures (no per-image scores: no interval)."""
    federated = figure(baselines.get("federated", {}).get("pooled_test", {}), key)
    pooled = figure(baselines.get("pooled", {}).get("pooled_test", {}), key)
    value = federated / pooled if federated is not None and pooled else math.nan
    return Ratio(
        math.nan if federated is None else federated,
        math.nan if pooled is None else pooled,
        Interval(value, math.nan, math.nan, 0),
    )


def _start_note(baselines: Mapping[str, Any]) -> str:
    """What the teachers' common start scored alone, when the coordinator pretrained it."""
    start = baselines.get("start")
    if not start:
        return ""
    test = start["pooled_test"]
    return (
        "; both from the coordinator's publicly pretrained start, which alone scores macro-AUROC "
        f"{_number(test.get('auroc_macro'))} and {OP_NAME} {_number(test.get('op_balanced_accuracy'))}"
    )


def teacher_claim(
    baselines: Mapping[str, Any] | None, scores: Mapping[str, np.ndarray] | None, task: Task
) -> Claim:
    """Claim (a); ``scores``: the arrays of ``baselines_scores.npz`` (None: point figures only)."""
    name = "teacher_vs_pooled"
    if not baselines:
        return Claim(
            name, None, f"Federated teacher vs pooled teacher: {_verdict(None)} (run with --baselines)."
        )
    if scores is not None:
        ratios = teacher_ratios(scores, task)
        images = f"{len(scores['labels'])} images"
    else:
        ratios = {k: _baseline_ratio(baselines, k) for k in ("auroc_macro", "op_balanced_accuracy")}
        images = "no per-image scores, so no interval"
    auroc, balanced = ratios["auroc_macro"].ratio, ratios["op_balanced_accuracy"].ratio
    held: bool | None = None
    if math.isfinite(auroc.value) and math.isfinite(balanced.value):
        held = auroc.value >= AUROC_RATIO and balanced.value >= BALANCED_RATIO
    parts = [
        f"{label} {_number(ratios[key].federated)} vs {_number(ratios[key].pooled)}: ratio "
        f"{_number(ratios[key].ratio.value)} ({_ci(ratios[key].ratio, IMAGES)}; target >= {target:g})"
        for key, label, target in (
            ("auroc_macro", "macro-AUROC", AUROC_RATIO),
            ("op_balanced_accuracy", f"{OP_NAME} of each site", BALANCED_RATIO),
        )
    ]
    sentence = (
        f"Federated teacher vs pooled teacher on the pooled test set ({images}): {_verdict(held)}: "
        + "; ".join(parts)
        + _start_note(baselines)
        + "."
    )
    return Claim(name, held, sentence, {k: v.to_dict() for k, v in ratios.items()})


def over_sites(values: list[float]) -> Interval:
    """The mean of per-site values with a bootstrap interval that resamples the sites."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    weights = stratified_weights(np.zeros(array.size, dtype=np.int64), RESAMPLES, SEED)
    return percentile_interval(float(array.mean()), weights @ array / array.size)


METRICS = (("auroc_macro", "macro-AUROC"), ("op_balanced_accuracy", OP_NAME))


@dataclass(frozen=True)
class SiteImages:
    """Per-image test scores of the sites' models (simulation/site_scores.py) and the two models a
    claim compares there."""

    scores: Mapping[str, Mapping[str, np.ndarray]]
    compared: str
    reference: str
    task: Task

    def statistic(self, site: str, model: str, key: str, weights: np.ndarray | None) -> np.ndarray:
        arrays = self.scores[site]
        if key == "auroc_macro":
            return macro_auroc(arrays[f"{model}_probabilities"], arrays["labels"], weights)
        return balanced_accuracy(arrays[f"{model}_decisions"], arrays["labels"], self.task, weights)

    def has(self, site: str) -> bool:
        arrays = self.scores.get(site, {})
        return all(f"{m}_decisions" in arrays for m in (self.compared, self.reference))


def image_resamples(
    images: SiteImages, key: str, pairs: Mapping[str, tuple[float, float]]
) -> dict[str, np.ndarray] | None:
    """Per site, compared minus reference in each bootstrap resample of the site's test images
    (stratified by class); None unless the rescoring reproduces every site's own two figures."""
    sites = sorted(pairs)
    if not sites or not all(images.has(s) for s in sites):
        return None
    for site in sites:
        rescored = [
            float(images.statistic(site, m, key, None)[0]) for m in (images.compared, images.reference)
        ]
        if not np.allclose(rescored, pairs[site], rtol=0.0, atol=1e-6):
            return None
    labels = [images.scores[s]["labels"] for s in sites]
    strata = np.concatenate([_strata(y, np.full(len(y), i), images.task) for i, y in enumerate(labels)])
    weights = stratified_weights(strata, RESAMPLES, SEED)
    ends = np.cumsum([len(y) for y in labels])
    out = {}
    for site, end, size in zip(sites, ends, (len(y) for y in labels), strict=True):
        w = weights[:, end - size : end]
        out[site] = images.statistic(site, images.compared, key, w) - images.statistic(
            site, images.reference, key, w
        )
    return out


def _comparison(
    label: str, differences: dict[str, float], floor: float | None, resampled: dict[str, np.ndarray] | None
) -> tuple[bool, str, dict[str, Any]]:
    """One figure's part of a claim: mean difference over the sites and the worst site, each with
    its interval (resampled images where ``resampled``, else resampled sites), and whether they
    clear -MEAN_MARGIN and ``floor`` (None: the mean must be above 0)."""
    worst = min(differences, key=lambda s: differences[s])
    mean = float(np.mean(list(differences.values())))
    worst_text = f"worst site {worst} {differences[worst]:+.3f}"
    if resampled is not None:
        over = " over the sites' test images"
        interval = percentile_interval(mean, np.mean(np.stack([resampled[s] for s in differences]), axis=0))
        worst_text += f" ({_ci(percentile_interval(differences[worst], resampled[worst]))})"
    else:
        over = " over sites"
        interval = over_sites(list(differences.values()))
    if floor is None:
        ok = mean > 0.0
        target = "target > 0"
    else:
        ok = mean >= -MEAN_MARGIN - 1e-12 and differences[worst] >= floor - 1e-12
        target = f"target >= {-MEAN_MARGIN:g}; {worst_text}, limit {floor:g}"
    text = f"{label}: mean difference {mean:+.3f} ({_ci(interval, over)}; {target})"
    data = {"mean_difference": interval.to_dict(), "per_site": differences, "interval_over": over.strip()}
    return ok, text, data


def _paired_claim(
    name: str,
    title: str,
    pairs: dict[str, dict[str, tuple[float | None, float | None]]],
    floor: float | None,
    images: SiteImages | None = None,
) -> Claim:
    """A claim over the sites from ``pairs[metric][site] = (compared, reference)``; a site
    without both figures of a metric is a miss."""
    sites = sorted({s for per_metric in pairs.values() for s in per_metric})
    parts, figures, held = [], {}, True
    misses: set[str] = set()
    for key, label in METRICS:
        known = {s: (a, b) for s, (a, b) in pairs[key].items() if a is not None and b is not None}
        misses |= set(sites) - set(known)
        if not known:
            held = False
            parts.append(f"{label}: no site sent it")
            continue
        resampled = image_resamples(images, key, known) if images is not None else None
        differences = {s: a - b for s, (a, b) in known.items()}
        ok, text, figures[key] = _comparison(label, differences, floor, resampled)
        held = held and ok
        parts.append(text)
    if misses:
        held = False
        parts.append(f"a miss each: {', '.join(sorted(misses))} (failed, or a figure missing)")
    figures["misses"] = sorted(misses)
    sentence = f"{title} ({len(sites)} sites): {_verdict(held)}: " + "; ".join(parts) + "."
    return Claim(name, held, sentence, figures)


def students_claim(
    check: Mapping[str, Any],
    scores: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    task: Task | None = None,
) -> Claim:
    """Claim (b) from the check before delivery (server/delivery_check.py); ``scores``: the sites'
    per-image scores (simulation/site_scores.py) for intervals over images."""
    title = "Delivered students vs the teacher at each site"
    sites = check.get("sites") or []
    if not any(s.get(f"student_{key}") is not None for s in sites for key, _ in METRICS):
        reason = "no site sent the check" if sites else "no student phase ran"
        return Claim("students_vs_teacher", None, f"{title}: {_verdict(None)} ({reason}).")
    pairs = {
        key: {
            str(s["site"]): (
                (s.get(f"student_{key}"), s.get(f"teacher_{key}"))
                if s["verdict"] != "failed"
                else (None, None)
            )
            for s in sites
        }
        for key, _ in METRICS
    }
    images = SiteImages(scores, "delivered", "teacher", task) if scores and task else None
    return _paired_claim("students_vs_teacher", title, pairs, -SITE_MARGIN, images)


def _kd_pair(
    row: Mapping[str, Any], distill: Mapping[str, Any], key: str
) -> tuple[float | None, float | None]:
    if key == "op_balanced_accuracy":  # each from the checked row, else from the distillation row

        def first(name: str) -> float | None:
            value = figure(row, name)
            return value if value is not None else figure(distill, name)

        return first("kd_op_balanced_accuracy"), first("nokd_op_balanced_accuracy")
    if figure(row, "kd_auroc_macro") is not None:
        return figure(row, "kd_auroc_macro"), figure(row, "nokd_auroc_macro")
    return figure(distill, "student_auroc_macro"), figure(distill, "nokd_auroc_macro")


def kd_claim(
    checked_rows: list[dict[str, Any]],
    distill_rows: list[dict[str, Any]],
    scores: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    task: Task | None = None,
    *,
    coordinator_start: bool = False,
) -> Claim:
    """Claim (c): each site's KD student vs its no-KD student (the checked phase's rows, with
    the distillation rows for what they lack; ``scores`` as for :func:`students_claim`).
    ``coordinator_start``: the KD students started from the student the coordinator distilled
    on public images, which a student without a teacher cannot have; the title says so."""
    title = "KD students vs students trained without KD at each site"
    if coordinator_start:
        title = (
            "KD students (from the coordinator's start, distilled from the teacher on public images) vs "
            "students trained without KD (no teacher, so from random weights; same epochs at the site)"
        )
    distill = {str(r.get("site")): r for r in distill_rows}
    rows = {str(r.get("site")): r for r in checked_rows} or distill
    if not any(k.startswith("nokd_") for r in [*rows.values(), *distill.values()] for k in r):
        return Claim(
            "kd_vs_nokd", None, f"{title}: {_verdict(None)} (no no-KD student: run with --baselines)."
        )
    pairs = {
        key: {
            site: _kd_pair(row, distill.get(site, {}), key) if row.get("status") == "ok" else (None, None)
            for site, row in rows.items()
        }
        for key, _ in METRICS
    }
    images = SiteImages(scores, "kd", "nokd", task) if scores and task else None
    return _paired_claim("kd_vs_nokd", title, pairs, None, images)
