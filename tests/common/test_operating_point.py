"""A site's own decision rule (common/operating_point.py): parsed criteria, fits, and files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.errors import ConfigError, ModelError
from common.operating_point import (
    BIAS_LIMIT,
    Criterion,
    OperatingPoint,
    fit_operating_point,
    metrics_at,
    parse_criterion,
)
from common.tasks import Task, get_task

MULTICLASS = get_task("normal-pneumonia-covid")
MULTILABEL = get_task("nih14")


def _collapsed(n_per_class: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that rank every image's own class above the others' images (AUROC 1) but
    whose argmax is class 0 for every image: a model that learnt the federation's class mix."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    logits = np.zeros((len(labels), 3))
    logits[:, 0] = 6.0
    logits[np.arange(len(labels)), labels] += 3.0 + rng.uniform(0, 1, len(labels))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities, np.eye(3)[labels]


def test_fit_on_collapsed_outputs_recovers_balanced_accuracy() -> None:
    probabilities, labels = _collapsed()
    assert (probabilities.argmax(axis=1) == 0).all()  # the premise: the argmax collapsed
    argmax = metrics_at(OperatingPoint.argmax(MULTICLASS), probabilities, labels, MULTICLASS)
    assert argmax["balanced_accuracy"] == pytest.approx(1 / 3)
    assert argmax["never_predicted"] == 2.0

    point = fit_operating_point(probabilities, labels, MULTICLASS, Criterion("balanced-accuracy"))

    at_point = metrics_at(point, probabilities, labels, MULTICLASS)
    assert at_point["balanced_accuracy"] == pytest.approx(1.0)
    assert at_point["never_predicted"] == 0.0
    assert point.validation_balanced_accuracy == pytest.approx(1.0)
    assert point.fitted_on_images == len(labels)
    assert set(point.decided_names(probabilities)) == set(MULTICLASS.classes)


def test_a_target_sensitivity_is_reached_on_the_validation_split() -> None:
    # Prepare: covid-19 images overlap the pneumonia ones, so balanced accuracy alone misses some
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 40)
    logits = rng.normal(0, 1, (len(labels), 3))
    logits[np.arange(len(labels)), labels] += 1.0
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    onehot = np.eye(3)[labels]
    criterion = parse_criterion("sensitivity:covid-19=0.95", MULTICLASS)

    point = fit_operating_point(probabilities, onehot, MULTICLASS, criterion)

    balanced = fit_operating_point(probabilities, onehot, MULTICLASS, Criterion("balanced-accuracy"))
    at_point = metrics_at(point, probabilities, onehot, MULTICLASS)
    assert metrics_at(balanced, probabilities, onehot, MULTICLASS)["sensitivity/covid-19"] < 0.95
    assert at_point["sensitivity/covid-19"] >= 0.95
    assert point.criterion == "sensitivity:covid-19=0.95"


def test_multilabel_thresholds_are_fitted_per_finding() -> None:
    rng = np.random.default_rng(2)
    n = 200
    labels = (rng.uniform(size=(n, MULTILABEL.num_classes)) < 0.2).astype(float)
    # every finding's probability is low (under 0.5) but higher for the images that have it
    probabilities = np.clip(0.05 + 0.25 * labels + rng.uniform(0, 0.1, labels.shape), 0, 1)
    labels[:5, 0] = np.nan  # unknown labels are left out of the fit

    point = fit_operating_point(probabilities, labels, MULTILABEL, Criterion("balanced-accuracy"))

    assert len(point.thresholds) == MULTILABEL.num_classes
    assert all(0.05 < t <= 0.4 for t in point.thresholds)
    assert metrics_at(point, probabilities, labels, MULTILABEL)["balanced_accuracy"] == pytest.approx(1.0)
    names = point.decided_names(probabilities[:2])
    assert all(isinstance(name, str) and name for name in names)
    assert OperatingPoint.argmax(MULTILABEL).decided_names(probabilities[:1]) == ["no finding"]


@pytest.mark.parametrize(
    "text", ["", "f1", "argmax:x", "sensitivity", "sensitivity:covid-19", "sensitivity:covid-19=1.5",
             "sensitivity:covid-19=0", "sensitivity:flu=0.9", "sensitivity:covid-19=abc"]
)  # fmt: skip
def test_a_bad_criterion_names_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--operating-point"):
        parse_criterion(text, MULTICLASS)


def test_criteria_parse_to_their_normal_form() -> None:
    assert parse_criterion("argmax", MULTICLASS) == Criterion("argmax")
    assert str(parse_criterion("balanced-accuracy", MULTICLASS)) == "balanced-accuracy"
    parsed = parse_criterion("sensitivity: covid-19=0.9,pneumonia=0.8", MULTICLASS)
    assert parsed.targets == (("covid-19", 0.9), ("pneumonia", 0.8))
    assert str(parsed) == "sensitivity:covid-19=0.9,pneumonia=0.8"


def test_an_operating_point_round_trips_through_its_dict() -> None:
    probabilities, labels = _collapsed()
    point = fit_operating_point(probabilities, labels, MULTICLASS, Criterion())
    again = OperatingPoint.from_dict(point.to_dict())
    assert again == point
    assert "log-prior shift" in again.describe()
    assert OperatingPoint.argmax(MULTICLASS).describe().startswith("argmax")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"format": "other"}, "not a"),
        ({"log_prior_shift": [0.0, 1.0]}, "one finite value per class"),
        ({"log_prior_shift": [0.0, math.inf, 1.0]}, "one finite value per class"),
        ({"log_prior_shift": [0.0, math.nan, 1.0]}, "one finite value per class"),
        ({"log_prior_shift": [0.0, BIAS_LIMIT + 1, 1.0]}, "beyond"),
        ({"log_prior_shift": ["a", 0.0, 1.0]}, "bad field"),
        ({"task_kind": "regression"}, "multiclass or multilabel"),
        ({"classes": None}, "bad field"),
        ({"validation_balanced_accuracy": 7.0}, r"\[0, 1\]"),
    ],
)
def test_from_dict_refuses_malformed_points(change: dict[str, object], reason: str) -> None:
    data = {**OperatingPoint.argmax(MULTICLASS).to_dict(), **change}
    with pytest.raises(ModelError, match=reason):
        OperatingPoint.from_dict(data, "test point")


def test_from_dict_refuses_thresholds_that_are_not_probabilities() -> None:
    data = {**OperatingPoint.argmax(MULTILABEL).to_dict()}
    data["thresholds"] = [1.5] * MULTILABEL.num_classes
    with pytest.raises(ModelError, match="probabilities"):
        OperatingPoint.from_dict(data)
    with pytest.raises(ModelError, match="not a"):
        OperatingPoint.from_dict(["not", "a", "mapping"])


@pytest.mark.parametrize("task", [MULTICLASS, MULTILABEL], ids=lambda t: t.kind)
def test_the_site_evaluation_reports_the_figures_of_the_operating_point(task: Task) -> None:
    from common.evaluation import EvaluationSettings, evaluate_scores

    if task is MULTICLASS:
        probabilities, labels = _collapsed(n_per_class=12)
    else:
        rng = np.random.default_rng(3)
        labels = (rng.uniform(size=(60, MULTILABEL.num_classes)) < 0.3).astype(float)
        probabilities = np.clip(0.1 + 0.2 * labels + rng.uniform(0, 0.15, labels.shape), 0, 1)
    point = fit_operating_point(probabilities, labels, task, Criterion())
    expected = metrics_at(point, probabilities, labels, task)

    result = evaluate_scores(
        task,
        labels,
        probabilities,
        EvaluationSettings(n_bootstrap=20, operating_point=point),
    )

    assert result.site_balanced_accuracy is not None
    assert result.site_balanced_accuracy.value == pytest.approx(expected["balanced_accuracy"])
    assert result.site_rule == f"site's operating point: {point.describe()}"
    for c in result.classes:
        assert c.site_sensitivity is not None
        assert c.site_sensitivity.value == pytest.approx(expected[f"sensitivity/{c.name}"], nan_ok=True)
    site = result.to_dict()["site_operating_point"]
    assert set(site) >= {"rule", "balanced_accuracy", "thresholds"}
    plain = evaluate_scores(task, labels, probabilities, EvaluationSettings(n_bootstrap=20))
    assert plain.site_balanced_accuracy is None


def test_a_class_the_validation_split_lacks_keeps_its_balancing_shift() -> None:
    task = get_task("normal-pneumonia-covid")
    rng = np.random.default_rng(3)
    true = rng.integers(0, 2, 200)  # no covid-19 image at this site
    logits = rng.normal(size=(200, 3)) + 2.0 * np.eye(3)[true]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    point = fit_operating_point(probabilities, np.eye(3)[true], task, Criterion())
    # a search would lower covid-19 until no image here is called covid-19 (every such call is an
    # error on this split); unsearched, it is still chosen for the images that look most like it
    assert (point.decide(probabilities) == 2).any()


def test_a_validation_split_of_one_class_keeps_the_models_own_rule() -> None:
    task = get_task("normal-pneumonia-covid")
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(80, 3))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    covid_only = np.tile([0.0, 0.0, 1.0], (80, 1))
    point = fit_operating_point(probabilities, covid_only, task, Criterion())
    assert point.log_prior_shift == (0.0, 0.0, 0.0)  # a search would call every image covid-19
