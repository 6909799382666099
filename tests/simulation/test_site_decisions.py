"""Decisions at each site's operating point: the pooled test set's op_balanced_accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.bootstrap import stratified_weights
from common.metrics import compute_metrics
from common.run_settings import check_run_config, run_settings_from_config
from common.tasks import get_task
from common.training import EvalResult
from simulation.baselines import pooled_test_figures
from simulation.site_decisions import balanced_accuracy, macro_auroc

TASK = get_task("normal-pneumonia-covid")


def collapsed_split(seed: int, counts: tuple[int, int, int]) -> EvalResult:
    """A model that ranks the classes well but whose argmax is always 'normal' (prior +8 on it)."""
    rng = np.random.default_rng(seed)
    true = np.repeat(np.arange(3), counts)
    logits = rng.normal(0.0, 1.0, (len(true), 3)) + 3.0 * np.eye(3)[true] + np.array([8.0, 0.0, 0.0])
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    targets = np.eye(3)[true].astype(np.float32)
    return EvalResult(0.5, len(true), compute_metrics(TASK, targets, probabilities), probabilities, targets)


def test_the_pooled_test_set_decided_at_each_sites_point_undoes_a_collapsed_argmax() -> None:
    # Prepare: two sites with different class mixes, a teacher whose argmax is always 'normal'
    settings = run_settings_from_config(check_run_config({"task": "normal-pneumonia-covid"}))
    per_site = {
        "site_00": {"val": collapsed_split(1, (30, 10, 20)), "test": collapsed_split(2, (60, 20, 40))},
        "site_01": {"val": collapsed_split(3, (5, 30, 25)), "test": collapsed_split(4, (10, 60, 50))},
    }

    # Execute
    figures, scores = pooled_test_figures(per_site, settings)

    # Assert: argmax is chance, each site's own point is far better; the arrays are the union
    assert figures["balanced_accuracy"] < 0.4
    assert figures["op_balanced_accuracy"] > 0.8
    assert figures["n"] == 240.0
    assert scores.site.tolist() == [0] * 120 + [1] * 120
    assert scores.decisions.shape == (240,)


def test_weighted_figures_match_the_plain_ones_and_resample_in_one_call() -> None:
    split = collapsed_split(5, (40, 30, 30))
    decisions = split.scores.argmax(axis=1)
    plain = balanced_accuracy(decisions, split.targets, TASK)
    assert plain.shape == (1,)
    assert plain[0] == pytest.approx(split.metrics.balanced_accuracy)
    assert macro_auroc(split.scores, split.targets)[0] == pytest.approx(split.metrics.auroc_macro)
    weights = stratified_weights(split.targets.argmax(axis=1), 50, seed=0)
    resampled = macro_auroc(split.scores, split.targets, weights)
    assert resampled.shape == (50,)
    assert np.all((resampled > 0.5) & (resampled <= 1.0))
    assert np.std(resampled) > 0


def test_multilabel_balanced_accuracy_is_the_mean_of_sensitivity_and_specificity() -> None:
    task = get_task("nih14")
    labels = np.zeros((4, task.num_classes))
    labels[:2, 0] = 1.0
    labels[:, 1:] = np.nan
    decisions = np.zeros((4, task.num_classes), dtype=int)
    decisions[0, 0] = 1
    decisions[2, 0] = 1
    # finding 0: sensitivity 1/2, specificity 1/2; the unknown findings are left out
    assert balanced_accuracy(decisions, labels, task)[0] == pytest.approx(0.5)


def test_the_site_model_files_follow_delivered_json_and_the_scores_read_back_by_site(tmp_path: Path) -> None:
    from simulation.site_scores import SEPARATOR, read_site_scores, site_model_files

    site = tmp_path / "site_00"
    (site / "global_student").mkdir(parents=True)
    (site / "student").mkdir()
    for path in ("global_teacher.pt", "student/student.pt", "global_student/student.pt"):
        (site / path).write_bytes(b"x")
    (site / "delivered.json").write_text(json.dumps({"folder": "global_student"}))

    files = site_model_files(site)

    assert files == {
        "teacher": site / "global_teacher.pt",
        "kd": site / "student" / "student.pt",
        "delivered": site / "global_student" / "student.pt",
    }  # no no-KD student kept: left out
    np.savez(
        tmp_path / "s.npz",
        **{f"site_00{SEPARATOR}labels": np.eye(3), f"site_00{SEPARATOR}kd_decisions": np.arange(3)},
    )
    read = read_site_scores(tmp_path / "s.npz")
    assert read is not None
    assert set(read["site_00"]) == {"labels", "kd_decisions"}
    assert read_site_scores(tmp_path / "missing.npz") is None
