"""Site evaluation statistics: vectorised bootstrap AUROC, intervals, operating points, calibration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.bootstrap import percentile_interval, stratified_weights, weighted_auroc, weighted_rate
from common.errors import ConfigError, DataError
from common.evaluation import (
    REPORT_FILES,
    EvaluationSettings,
    evaluate_scores,
    parse_thresholds,
    write_report,
)
from common.tasks import get_task

MULTICLASS = get_task("normal-pneumonia-covid")
MULTILABEL = get_task("nih14")


def _multiclass_data(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One-hot labels and softmax scores that carry real (imperfect) signal."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, n)
    logits = rng.normal(0.0, 1.0, (n, 3))
    logits[np.arange(n), truth] += 1.5
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return np.eye(3)[truth], scores


def test_weighted_auroc_with_unit_weights_is_sklearns_auroc_including_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500) + 0.4 * y, 1)  # many ties
    assert weighted_auroc(y, s, np.ones((1, 500)))[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_weighted_auroc_of_a_resample_equals_sklearn_on_the_expanded_resample() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    s = rng.random(200) + 0.5 * y
    weights = stratified_weights(y, 4, seed=3)
    values = weighted_auroc(y, s, weights)
    for b in range(4):
        rows = np.repeat(np.arange(200), weights[b])
        assert values[b] == pytest.approx(roc_auc_score(y[rows], s[rows]), abs=1e-12)


def test_weighted_auroc_is_nan_without_both_classes() -> None:
    assert math.isnan(weighted_auroc(np.ones(5), np.arange(5.0), np.ones((1, 5)))[0])


def test_stratified_weights_keep_class_counts_and_are_seeded() -> None:
    strata = np.array([0] * 30 + [1] * 10 + [2] * 5)
    weights = stratified_weights(strata, 50, seed=7)
    assert weights.shape == (50, 45)
    for value, size in ((0, 30), (1, 10), (2, 5)):
        assert (weights[:, strata == value].sum(axis=1) == size).all()
    np.testing.assert_array_equal(weights, stratified_weights(strata, 50, seed=7))
    assert not np.array_equal(weights, stratified_weights(strata, 50, seed=8))
    with pytest.raises(ConfigError, match="bootstrap"):
        stratified_weights(strata, 0, seed=0)


def test_weighted_rate_counts_hits_among_members() -> None:
    hits = np.array([True, False, True, True])
    members = np.array([True, True, True, False])
    assert weighted_rate(hits, members, np.ones((1, 4)))[0] == pytest.approx(2 / 3)
    assert weighted_rate(hits, members, np.array([[0, 2, 1, 5]]))[0] == pytest.approx(1 / 3)


def test_percentile_interval_undefined_value_has_no_interval() -> None:
    interval = percentile_interval(math.nan, np.array([0.5, 0.6]))
    assert math.isnan(interval.low)
    assert math.isnan(interval.high)


def test_multiclass_intervals_contain_the_point_estimates_which_match_sklearn() -> None:
    targets, scores = _multiclass_data()
    result = evaluate_scores(MULTICLASS, targets, scores, EvaluationSettings(n_bootstrap=400, seed=0))
    for k, c in enumerate(result.classes):
        assert c.auroc.value == pytest.approx(roc_auc_score(targets[:, k], scores[:, k]))
        assert c.auroc.low < c.auroc.value < c.auroc.high
        assert c.sensitivity.low <= c.sensitivity.value <= c.sensitivity.high
        assert c.specificity.low <= c.specificity.value <= c.specificity.high
        assert c.auroc.resamples == 400
    assert result.auroc_macro.low < result.auroc_macro.value < result.auroc_macro.high
    assert result.auroc_macro.value == pytest.approx(np.mean([c.auroc.value for c in result.classes]))
    assert result.balanced_accuracy.low <= result.balanced_accuracy.value <= result.balanced_accuracy.high
    assert result.operating_point == "argmax"
    assert np.asarray(result.confusion).sum() == len(targets)


def test_bootstrap_is_deterministic_with_a_seed_and_changes_with_it() -> None:
    targets, scores = _multiclass_data()
    first = evaluate_scores(MULTICLASS, targets, scores, EvaluationSettings(n_bootstrap=200, seed=5))
    again = evaluate_scores(MULTICLASS, targets, scores, EvaluationSettings(n_bootstrap=200, seed=5))
    other = evaluate_scores(MULTICLASS, targets, scores, EvaluationSettings(n_bootstrap=200, seed=6))
    assert first.to_dict() == again.to_dict()
    assert first.auroc_macro.value == other.auroc_macro.value
    assert (first.auroc_macro.low, first.auroc_macro.high) != (other.auroc_macro.low, other.auroc_macro.high)


def test_site_thresholds_give_their_own_confusion_and_rates() -> None:
    targets, scores = _multiclass_data()
    thresholds = parse_thresholds(MULTICLASS, None, {"pneumonia": 0.2})
    assert thresholds == {"pneumonia": 0.2}
    result = evaluate_scores(
        MULTICLASS, targets, scores, EvaluationSettings(n_bootstrap=100, thresholds=thresholds)
    )
    pneumonia = result.classes[1]
    y, chosen = targets[:, 1] == 1, scores[:, 1] >= 0.2
    assert pneumonia.site_confusion == [
        [int(np.sum(~chosen & ~y)), int(np.sum(chosen & ~y))],
        [int(np.sum(~chosen & y)), int(np.sum(chosen & y))],
    ]
    assert pneumonia.site_sensitivity is not None
    assert pneumonia.site_sensitivity.value == pytest.approx(np.sum(chosen & y) / np.sum(y))
    assert result.classes[0].site_threshold is None
    assert result.site_balanced_accuracy is not None
    with pytest.raises(ConfigError, match="pneumonia"):
        parse_thresholds(MULTICLASS, None, {"pneumonitis": 0.2})


def test_expected_calibration_error_of_known_cases() -> None:
    task = get_task("normal-pneumonia")
    n = 100
    targets = np.eye(2)[np.zeros(n, dtype=int)]  # every image is 'normal'
    confident = np.tile([0.6, 0.4], (n, 1))  # always right at confidence 0.6 -> ECE 0.4
    result = evaluate_scores(task, targets, confident, EvaluationSettings(n_bootstrap=10))
    assert result.ece == pytest.approx(0.4)
    truth = np.array([0] * 80 + [1] * 20)  # 80% right at confidence 0.8 -> ECE 0
    calibrated = np.tile([0.8, 0.2], (n, 1))
    result = evaluate_scores(task, np.eye(2)[truth], calibrated, EvaluationSettings(n_bootstrap=10))
    assert result.ece == pytest.approx(0.0, abs=1e-12)


def test_multilabel_reports_per_finding_and_skips_unknown_labels() -> None:
    rng = np.random.default_rng(4)
    n, c = 200, MULTILABEL.num_classes
    targets = (rng.random((n, c)) < 0.3).astype(float)
    scores = np.clip(0.35 * targets + rng.random((n, c)) * 0.65, 0, 1)
    targets[:50, 0] = np.nan  # finding 0 unknown for a quarter of the images
    targets[:, 1] = 0.0  # finding 1 never present: AUROC undefined
    result = evaluate_scores(MULTILABEL, targets, scores, EvaluationSettings(n_bootstrap=200))
    assert [c.name for c in result.classes] == list(MULTILABEL.classes)
    first = result.classes[0]
    assert first.positives + first.negatives == 150
    known = ~np.isnan(targets[:, 0])
    assert first.auroc.value == pytest.approx(roc_auc_score(targets[known, 0], scores[known, 0]))
    assert first.auroc.low < first.auroc.value < first.auroc.high
    assert math.isnan(result.classes[1].auroc.value)
    assert any(MULTILABEL.classes[1] in note for note in result.notes)
    assert math.isfinite(result.auroc_macro.value)
    assert result.operating_point == "threshold 0.5"
    assert len(result.confusion) == c


def test_wrong_shapes_are_refused() -> None:
    targets, scores = _multiclass_data(20)
    with pytest.raises(DataError):
        evaluate_scores(MULTICLASS, targets, scores[:, :2])


def test_report_files_are_written(tmp_path: Path) -> None:
    targets, scores = _multiclass_data(60)
    result = evaluate_scores(MULTICLASS, targets, scores, EvaluationSettings(n_bootstrap=50))
    model = {"path": "m.onnx", "sha256": "0" * 64, "kind": "onnx", "role": "r", "image_size": 32}
    data = {"format": "image-folder", "path": "d", "images": 60, "unreadable": 0}
    report = write_report(result, tmp_path / "out", model=model, data=data)
    for name in REPORT_FILES:
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert report["results"]["auroc_macro"]["value"] == pytest.approx(result.auroc_macro.value)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind
