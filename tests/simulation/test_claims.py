"""The report's opening claims and its new results.json keys, from fabricated experiment folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.jsonio import write_json
from common.tasks import get_task
from server.delivery_check import delivery_check
from server.run_folder import RunFolder
from simulation.claims import kd_claim, students_claim, teacher_claim
from simulation.report import build_report

TASK = get_task("normal-pneumonia-covid")


def final_row(site: str, teacher: float, student: float, **extra: Any) -> dict[str, Any]:
    return {
        "round": 1,
        "phase": "student-final",
        "site": site,
        "status": "ok",
        "teacher_auroc_macro": 0.90,
        "student_auroc_macro": 0.90 - (teacher - student),
        "teacher_op_balanced_accuracy": teacher,
        "student_op_balanced_accuracy": student,
        "student_op_never_predicted": 0.0,
        "kd_op_balanced_accuracy": student,
        "nokd_op_balanced_accuracy": student - 0.1,
        **extra,
    }


def distill_row(site: str, kd: float = 0.85, nokd: float = 0.70) -> dict[str, Any]:
    return {
        "round": 2,
        "phase": "distill",
        "site": site,
        "status": "ok",
        "student_auroc_macro": kd,
        "nokd_auroc_macro": nokd,
    }


def pooled_scores(seed: int, federated_noise: float) -> dict[str, np.ndarray]:
    """Per-image pooled test scores as baselines_scores.npz holds them: 2 sites x 3 classes."""
    rng = np.random.default_rng(seed)
    true = np.tile(np.repeat(np.arange(3), 40), 2)
    labels = np.eye(3)[true]
    pooled = labels * 2.0 + rng.normal(0, 1, labels.shape)
    federated = labels * 2.0 * (1 - federated_noise) + rng.normal(0, 1, labels.shape)
    return {
        "labels": labels,
        "site": np.repeat([0, 1], 120),
        "pooled_probabilities": pooled,
        "pooled_decisions": pooled.argmax(axis=1),
        "federated_probabilities": federated,
        "federated_decisions": federated.argmax(axis=1),
    }


BASELINES = {"federated": {"pooled_test": {}}, "pooled": {"pooled_test": {}}}


def test_the_teacher_claim_holds_for_a_teacher_as_good_as_the_pooled_one() -> None:
    scores = pooled_scores(0, 0.0)
    scores["federated_probabilities"] = scores["pooled_probabilities"]
    scores["federated_decisions"] = scores["pooled_decisions"]
    claim = teacher_claim(BASELINES, scores, TASK)
    assert claim.held is True
    assert "**held**" in claim.sentence
    assert "ratio 1.000 (95% CI 1.000 to 1.000 over the test images; target >= 0.97)" in claim.sentence
    assert "240 images" in claim.sentence


def test_the_teacher_claim_fails_for_a_weaker_teacher_with_an_interval_below_target() -> None:
    claim = teacher_claim(BASELINES, pooled_scores(1, 0.9), TASK)
    assert claim.held is False
    assert "**not held**" in claim.sentence
    auroc = claim.figures["auroc_macro"]
    assert auroc["low"] <= auroc["value"] <= auroc["high"] < 0.97
    assert auroc["resamples"] == 1000


def test_the_teacher_claim_without_baselines_or_per_image_scores() -> None:
    assert teacher_claim(None, None, TASK).held is None
    figures = {
        "federated": {"pooled_test": {"auroc_macro": 0.95, "op_balanced_accuracy": 0.9}},
        "pooled": {"pooled_test": {"auroc_macro": 0.96, "op_balanced_accuracy": 0.9}},
    }
    claim = teacher_claim(figures, None, TASK)
    assert claim.held is True
    assert "macro-AUROC 0.950 vs 0.960: ratio 0.990 (no interval; target >= 0.97)" in claim.sentence
    older = {k: {"pooled_test": {"auroc_macro": 0.9}} for k in ("federated", "pooled")}  # no op figure
    unmeasured = teacher_claim(older, None, TASK)
    assert unmeasured.held is None
    assert "n/a vs n/a: ratio n/a" in unmeasured.sentence


@pytest.mark.parametrize(
    ("rows", "held", "words"),
    [
        ([final_row("a", 0.80, 0.79), final_row("b", 0.80, 0.80)], True, "mean difference -0.005"),
        ([final_row("a", 0.80, 0.81), final_row("b", 0.80, 0.74)], False, "worst site b -0.060, limit -0.05"),
        ([final_row("a", 0.80, 0.70), final_row("b", 0.80, 0.75)], False, "mean difference -0.075"),
        (
            [final_row("a", 0.80, 0.80), {"phase": "student-final", "site": "b", "status": "failed"}],
            False,
            "a miss each: b (failed, or a figure missing)",
        ),
    ],
)
def test_the_students_claim_from_the_check_before_delivery(
    rows: list[dict[str, Any]], held: bool, words: str
) -> None:
    claim = students_claim(delivery_check(rows))
    assert claim.held is held
    assert words in claim.sentence
    assert "over sites" in claim.sentence


def test_kd_vs_nokd_holds_when_kd_is_better_on_both_figures() -> None:
    rows = [final_row("a", 0.8, 0.8), final_row("b", 0.8, 0.7)]
    held = kd_claim(rows, [distill_row("a"), distill_row("b")])
    assert held.held is True
    assert "op" not in held.figures["misses"]
    assert held.figures["auroc_macro"]["per_site"] == pytest.approx({"a": 0.15, "b": 0.15})
    worse = kd_claim(rows, [distill_row("a", kd=0.6), distill_row("b", kd=0.6)])
    assert worse.held is False
    assert "macro-AUROC: mean difference -0.100" in worse.sentence
    no_baseline = [{k: v for k, v in r.items() if not k.startswith("nokd")} for r in rows]
    assert kd_claim(no_baseline, [{"site": "a", "status": "ok"}]).held is None
    assert "random weights" not in held.sentence
    started = kd_claim(rows, [distill_row("a"), distill_row("b")], coordinator_start=True)
    assert "from the coordinator's start" in started.sentence
    assert "random weights" in started.sentence


def _experiment(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    out = tmp_path / "exp"
    folder = RunFolder(out / "run")
    aggregate = {"round": 1, "phase": "aggregate", "site": "_global", "val_auroc_macro": 0.8}
    folder.append_metrics([aggregate, *rows])
    write_json(
        out / "run" / "summary.json", {"task": "normal-pneumonia-covid", "federated_student": "delivered"}
    )
    return out


def test_results_json_and_the_report_open_with_the_claims_and_carry_the_check(tmp_path: Path) -> None:
    older = {"round": 1, "phase": "student-final", "site": "c", "status": "ok", "student_auroc_macro": 0.7}
    rows = [distill_row("a"), distill_row("b"), final_row("a", 0.80, 0.79), final_row("b", 0.80, 0.70), older]
    out = _experiment(tmp_path, rows)
    teacher = {"pooled_test": {"auroc_macro": 0.9}, "pooled_val": {}, "sites": {}}
    write_json(
        out / "baselines.json", {"federated": teacher, "pooled": teacher, "budget_epochs": 2, "local": {}}
    )
    np.savez_compressed(out / "baselines_scores.npz", **pooled_scores(2, 0.0))  # type: ignore[arg-type]

    report = build_report(out)

    results = json.loads((out / "report" / "results.json").read_text())
    delivered = {r["site"]: r for r in results["delivered"]}
    assert delivered["a"]["student_op_balanced_accuracy"] == 0.79
    assert delivered["c"]["teacher_op_balanced_accuracy"] is None  # the key is there for scripts
    assert {"teacher_auroc_macro", "student_auroc_macro"} <= set(delivered["c"])
    assert [s["verdict"] for s in results["delivery_check"]["sites"]] == ["fit", "unfit", "n/a"]
    assert [c["name"] for c in results["claims"]] == [
        "teacher_vs_pooled",
        "students_vs_teacher",
        "kd_vs_nokd",
    ]
    assert results["claims"][1]["held"] is False  # site b is 0.10 below, site c sent no check
    text = report.read_text()
    assert text.index("## Claims") < text.index("## Run") < text.index("## Check before delivery")
    assert "- Federated teacher vs pooled teacher on the pooled test set (240 images)" in text
    assert "| b | 0.900 | 0.800 | 0.800 | 0.700 | 0 | **UNFIT**: balanced accuracy 0.700" in text


def site_images(seed: int, student_noise: float) -> dict[str, np.ndarray]:
    """One site's per-image test scores as site_scores.npz holds them (teacher and delivered)."""
    rng = np.random.default_rng(seed)
    labels = np.eye(3)[np.repeat(np.arange(3), 30)]
    teacher = labels * 2.0 + rng.normal(0, 1, labels.shape)
    student = labels * 2.0 * (1 - student_noise) + rng.normal(0, 1, labels.shape)
    return {
        "labels": labels,
        "teacher_probabilities": teacher,
        "teacher_decisions": teacher.argmax(axis=1),
        "delivered_probabilities": student,
        "delivered_decisions": student.argmax(axis=1),
    }


def _reported(site: str, images: dict[str, np.ndarray]) -> dict[str, Any]:
    """The site's own figures of the same images (what a simulated site reports, exactly)."""
    from simulation.site_decisions import balanced_accuracy, macro_auroc

    labels = images["labels"]
    figures = {
        f"{who}_auroc_macro": float(macro_auroc(images[f"{model}_probabilities"], labels)[0])
        for who, model in (("teacher", "teacher"), ("student", "delivered"))
    }
    figures |= {
        f"{who}_op_balanced_accuracy": float(balanced_accuracy(images[f"{model}_decisions"], labels, TASK)[0])
        for who, model in (("teacher", "teacher"), ("student", "delivered"))
    }
    return {"phase": "student-final", "site": site, "status": "ok", **figures}


def test_the_students_claim_resamples_the_sites_images_where_they_reproduce_the_sites_figures() -> None:
    scores = {"a": site_images(3, 0.0), "b": site_images(4, 0.5)}
    rows = [_reported(site, images) for site, images in scores.items()]

    paired = students_claim(delivery_check(rows), scores, TASK)

    assert "over the sites' test images; target >= -0.02" in paired.sentence
    assert "worst site b" in paired.sentence
    auroc = paired.figures["auroc_macro"]
    assert auroc["interval_over"] == "over the sites' test images"
    assert (
        auroc["mean_difference"]["low"] < auroc["mean_difference"]["value"] < auroc["mean_difference"]["high"]
    )
    rows[0]["student_auroc_macro"] += 0.01  # a figure the rescoring does not reproduce
    fallback = students_claim(delivery_check(rows), scores, TASK)
    assert fallback.figures["auroc_macro"]["interval_over"] == "over sites"
    assert fallback.figures["op_balanced_accuracy"]["interval_over"] == "over the sites' test images"
