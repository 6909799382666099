"""compute_metrics against scikit-learn on random data and against small hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from common.errors import DataError
from common.metrics import Metrics, compute_metrics
from common.tasks import Task

MC = Task("toy-mc", "multiclass", ("a", "b", "c"))
ML = Task("toy-ml", "multilabel", ("f0", "f1", "f2", "f3"))


def _random_multiclass(rng: np.random.Generator, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return np.eye(c)[y], scores


def test_multiclass_matches_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(1)
    targets, scores = _random_multiclass(rng, 200, 3)
    y, pred = targets.argmax(1), scores.argmax(1)

    m = compute_metrics(MC, targets, scores)

    assert m.accuracy == pytest.approx(accuracy_score(y, pred))
    assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, pred))
    assert m.auroc_macro == pytest.approx(roc_auc_score(y, scores, multi_class="ovr", average="macro"))
    assert m.f1_macro == pytest.approx(f1_score(y, pred, average="macro"))
    assert m.confusion == confusion_matrix(y, pred).tolist()
    for k in range(3):
        assert m.auroc[k] == pytest.approx(roc_auc_score(y == k, scores[:, k]))
        assert m.sensitivity[k] == pytest.approx(recall_score(y == k, pred == k))
        assert m.specificity[k] == pytest.approx(recall_score(y != k, pred != k))
    assert m.notes == ()


def test_multiclass_hand_worked_case() -> None:
    # true: a, a, b, c; predicted (argmax): a, b, b, c
    targets = np.eye(3)[[0, 0, 1, 2]]
    scores = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]])

    m = compute_metrics(MC, targets, scores)

    assert m.confusion == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert m.accuracy == pytest.approx(3 / 4)
    assert m.sensitivity == pytest.approx((1 / 2, 1.0, 1.0))
    assert m.specificity == pytest.approx((1.0, 2 / 3, 1.0))
    assert m.balanced_accuracy == pytest.approx(5 / 6)
    # b's one positive (0.5) beats 2 of its 3 negatives (0.2, 0.6, 0.3)
    assert m.auroc == pytest.approx((1.0, 2 / 3, 1.0))
    assert m.auroc_macro == pytest.approx(8 / 9)
    assert m.f1 == pytest.approx((2 / 3, 2 / 3, 1.0))
    assert m.f1_macro == pytest.approx(7 / 9)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_absent_class_is_nan_and_left_out_of_macro() -> None:
    targets = np.eye(3)[[0, 0, 1, 1]]  # class c never occurs
    scores = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6]])

    m = compute_metrics(MC, targets, scores)

    assert math.isnan(m.auroc[2])
    assert math.isnan(m.sensitivity[2])
    assert m.specificity[2] == pytest.approx(3 / 4)  # one of four negatives predicted as c
    assert m.auroc_macro == pytest.approx(np.mean(m.auroc[:2]))
    assert any("'c'" in note for note in m.notes)
    # balanced accuracy averages recall over the classes present, as scikit-learn does
    assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(targets.argmax(1), scores.argmax(1)))


def test_multiclass_single_class_targets() -> None:
    targets = np.eye(3)[[1, 1, 1]]
    scores = np.array([[0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1]])

    m = compute_metrics(MC, targets, scores)

    assert all(math.isnan(v) for v in m.auroc)
    assert math.isnan(m.auroc_macro)
    assert m.accuracy == pytest.approx(2 / 3)
    assert m.sensitivity[1] == pytest.approx(2 / 3)
    assert len(m.notes) == 3


def test_multilabel_matches_sklearn_with_nan_masks() -> None:
    rng = np.random.default_rng(2)
    n = 300
    labels = (rng.random((n, 4)) < 0.3).astype(float)
    scores = 1 / (1 + np.exp(-(rng.normal(size=(n, 4)) + 2 * labels - 1)))
    targets = labels.copy()
    targets[rng.random((n, 4)) < 0.25] = np.nan

    m = compute_metrics(ML, targets, scores)

    for k in range(4):
        known = ~np.isnan(targets[:, k])
        y, s = targets[known, k], scores[known, k]
        pred = s >= 0.5
        assert m.auroc[k] == pytest.approx(roc_auc_score(y, s))
        assert m.sensitivity[k] == pytest.approx(recall_score(y, pred))
        assert m.specificity[k] == pytest.approx(recall_score(1 - y, ~pred))
        assert m.f1[k] == pytest.approx(f1_score(y, pred))
    assert m.auroc_macro == pytest.approx(np.mean(m.auroc))
    known_all = ~np.isnan(targets)
    assert m.accuracy == pytest.approx(np.mean((scores >= 0.5)[known_all] == targets[known_all].astype(bool)))


def test_multilabel_without_nan_equals_sklearn_macro() -> None:
    rng = np.random.default_rng(3)
    targets = (rng.random((120, 4)) < 0.4).astype(float)
    scores = np.clip(0.6 * targets + 0.5 * rng.random((120, 4)), 0, 1)

    m = compute_metrics(ML, targets, scores)

    assert m.auroc_macro == pytest.approx(roc_auc_score(targets, scores, average="macro"))
    assert m.f1_macro == pytest.approx(f1_score(targets, scores >= 0.5, average="macro"))


def test_multilabel_hand_worked_case() -> None:
    task = Task("toy-ml2", "multilabel", ("x", "y"))
    targets = np.array([[1, 0], [0, 0], [np.nan, 0], [1, np.nan]], dtype=float)
    scores = np.array([[0.9, 0.6], [0.4, 0.1], [0.99, 0.2], [0.3, 0.8]])

    m = compute_metrics(task, targets, scores)

    # x: known y=[1,0,1], s=[.9,.4,.3] -> one of two positive/negative pairs ordered: 0.5
    assert m.auroc[0] == pytest.approx(0.5)
    assert math.isnan(m.auroc[1])  # y has only negatives among known labels
    assert m.auroc_macro == pytest.approx(0.5)
    assert m.confusion == [[[1, 0], [1, 1]], [[2, 1], [0, 0]]]
    assert m.sensitivity[0] == pytest.approx(0.5)
    assert math.isnan(m.sensitivity[1])
    assert m.specificity == pytest.approx((1.0, 2 / 3))
    assert m.f1 == pytest.approx((2 / 3, 0.0))
    assert m.f1_macro == pytest.approx(1 / 3)
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.balanced_accuracy == pytest.approx(0.75)
    assert any("'y'" in note and "negative" in note for note in m.notes)


def test_multilabel_finding_with_no_known_label() -> None:
    task = Task("toy-ml3", "multilabel", ("x", "y"))
    targets = np.array([[1, np.nan], [0, np.nan]], dtype=float)
    scores = np.array([[0.7, 0.5], [0.2, 0.5]])

    m = compute_metrics(task, targets, scores)

    assert m.auroc[0] == pytest.approx(1.0)
    assert math.isnan(m.auroc[1])
    assert m.auroc_macro == pytest.approx(1.0)
    assert m.confusion[1] == [[0, 0], [0, 0]]


def test_scalars_have_stable_names_and_to_dict_keeps_confusion() -> None:
    targets, scores = _random_multiclass(np.random.default_rng(4), 30, 3)
    m = compute_metrics(MC, targets, scores)

    scalars = m.scalars()

    expected = {"accuracy", "balanced_accuracy", "auroc_macro", "f1_macro"}
    for name in ("auroc", "sensitivity", "specificity", "f1"):
        expected |= {f"{name}/{c}" for c in MC.classes}
    assert set(scalars) == expected
    assert all(isinstance(v, float) for v in scalars.values())
    assert scalars["auroc/b"] == m.auroc[1]
    assert m.to_dict()["confusion"] == m.confusion
    assert isinstance(m, Metrics)


def test_empty_evaluation_is_all_nan() -> None:
    m = compute_metrics(MC, np.zeros((0, 3)), np.zeros((0, 3)))

    assert m.n == 0
    assert all(math.isnan(v) for v in m.scalars().values())


@pytest.mark.parametrize(
    ("targets", "scores", "message"),
    [
        (np.eye(3)[[0, 1]], np.full((2, 2), 0.5), "shape"),
        (np.eye(2)[[0, 1]], np.full((2, 2), 0.5), "shape"),
        (np.array([[1.0, 1.0, 0.0]]), np.full((1, 3), 1 / 3), "one-hot"),
        (np.array([[np.nan, 1.0, 0.0]]), np.full((1, 3), 1 / 3), "NaN"),
        (np.eye(3)[[0]], np.array([[np.nan, 0.5, 0.5]]), "diverged"),
    ],
)
def test_bad_multiclass_inputs_raise(targets: np.ndarray, scores: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        compute_metrics(MC, targets, scores)


def test_multilabel_rejects_labels_other_than_0_1_nan() -> None:
    targets = np.array([[1.0, -1.0, 0.0, 0.0]])
    with pytest.raises(DataError, match="1, 0 or NaN"):
        compute_metrics(ML, targets, np.full((1, 4), 0.5))
