"""The check before delivery in the coordinator's summary, from fabricated site replies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.run_settings import load_schema, run_settings_from_config
from server.delivery_check import delivery_check
from server.reporting import write_summary
from server.run_folder import RunFolder

CLASSES = ("Normal", "Pneumonia", "COVID-19")


def site_row(
    site: str, teacher: float, student: float, *, never: tuple[str, ...] = (), **extra: Any
) -> dict[str, Any]:
    """A site's student-final reply as the site-side contract writes it."""
    row: dict[str, Any] = {
        "round": 1,
        "phase": "student-final",
        "site": site,
        "status": "ok",
        "teacher_auroc_macro": 0.9,
        "student_auroc_macro": 0.88,
        "teacher_op_balanced_accuracy": teacher,
        "student_op_balanced_accuracy": student,
        "student_op_never_predicted": float(len(never)),
        "delivery_check_ok": float(teacher - student <= 0.05 and not never),
    }
    for name in CLASSES:
        row[f"student_op_sensitivity/{name}"] = 0.0 if name in never else 0.8
        row[f"student_op_specificity/{name}"] = 1.0 if name in never else 0.85
    row.update(extra)
    return row


ROWS = [
    {"round": 3, "phase": "distill", "site": s, "status": "ok"}
    for s in ("site_a", "site_b", "site_c", "site_d")
] + [
    site_row("site_a", 0.80, 0.79),
    site_row("site_b", 0.80, 0.70),
    site_row("site_c", 0.80, 0.78, never=("COVID-19",)),
    {"round": 1, "phase": "student-final", "site": "site_d", "status": "failed", "reason": "out of memory"},
]


def test_the_check_flags_each_unfit_or_failed_site_with_its_reason() -> None:
    check = delivery_check(ROWS)

    by_site = {s["site"]: s for s in check["sites"]}
    assert check["phase"] == "student-final"
    assert {k: s["verdict"] for k, s in by_site.items()} == {
        "site_a": "fit",
        "site_b": "unfit",
        "site_c": "unfit",
        "site_d": "failed",
    }
    assert "0.700 vs the teacher's 0.800" in by_site["site_b"]["reason"]
    assert by_site["site_c"]["reason"] == "never predicts COVID-19"
    assert by_site["site_c"]["never_predicted_classes"] == ["COVID-19"]
    assert by_site["site_d"]["reason"] == "out of memory"
    assert (check["fit"], check["unfit"], check["failed"], check["all_fit"]) == (1, 2, 1, False)


def test_a_gap_of_exactly_the_margin_is_fit_and_just_over_it_is_not() -> None:
    at_margin = site_row("site_a", 0.80, 0.75)
    del at_margin["delivery_check_ok"]  # the coordinator reads the figures itself
    over = site_row("site_b", 0.80, 0.749)
    del over["delivery_check_ok"]
    verdicts = [s["verdict"] for s in delivery_check([at_margin, over])["sites"]]
    assert verdicts == ["fit", "unfit"]


def test_the_sites_own_check_decides_over_rounded_figures_and_missing_keys_are_na() -> None:
    rounded = site_row("site_a", 0.80, 0.76, delivery_check_ok=0.0)  # exact figures at the site were worse
    older = {
        "round": 1,
        "phase": "student-final",
        "site": "site_b",
        "status": "ok",
        "student_auroc_macro": 0.7,
    }
    sites = delivery_check([rounded, older])["sites"]
    assert sites[0]["verdict"] == "unfit"
    assert "the site's own check failed" in sites[0]["reason"]
    assert sites[1]["verdict"] == "n/a"
    assert sites[1]["teacher_op_balanced_accuracy"] is None


def test_a_site_missing_from_the_student_phase_failed_there_and_distill_rows_serve_without_it() -> None:
    rows = [
        {**site_row("site_a", 0.8, 0.8), "phase": "distill"},
        {**site_row("site_b", 0.8, 0.8), "phase": "distill"},
        site_row("site_a", 0.8, 0.8),
    ]
    check = delivery_check(rows)
    assert [(s["site"], s["verdict"]) for s in check["sites"]] == [("site_a", "fit"), ("site_b", "failed")]
    only_distill = delivery_check(rows[:2])
    assert only_distill["phase"] == "distill"
    assert only_distill["all_fit"] is True


def test_summary_md_and_json_carry_the_table(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.append_metrics(
        [*ROWS, {"round": 1, "phase": "aggregate", "site": "_global", "val_auroc_macro": 0.7}]
    )
    settings = run_settings_from_config(load_schema())

    write_summary(folder, settings=settings, strategy="fedavg", best_round=1, distill_rows=[], seconds=1.0)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["verdict"] for s in summary["delivery_check"]["sites"]] == ["fit", "unfit", "unfit", "failed"]
    markdown = (tmp_path / "summary.md").read_text()
    assert "## Check before delivery" in markdown
    assert "| site_a | 0.900 | 0.880 | 0.800 | 0.790 | 0 | fit |" in markdown
    assert (
        "| site_c | 0.900 | 0.880 | 0.800 | 0.780 | 1 (COVID-19) | **UNFIT**: never predicts COVID-19 |"
        in markdown
    )
    assert "| site_d | n/a | n/a | n/a | n/a | n/a | **FAILED**: out of memory |" in markdown
    assert "1 of 4 site(s) fit; 2 unfit, 1 failed" in markdown


def test_a_class_never_predicted_is_unfit_even_if_the_site_says_fit_and_names_need_the_count() -> None:
    row = site_row("site_a", 0.80, 0.80, never=("COVID-19",), delivery_check_ok=1.0)
    row["student_op_specificity/Normal"] = 1.0  # rounded up: its sensitivity is 0.8, so not named
    entry = delivery_check([row])["sites"][0]
    assert (entry["verdict"], entry["reason"]) == ("unfit", "never predicts COVID-19")
    row["student_op_sensitivity/Normal"] = 0.0  # two candidates for a count of one: no names
    entry = delivery_check([row])["sites"][0]
    assert (entry["never_predicted"], entry["never_predicted_classes"]) == (1, [])
    assert entry["reason"] == "never predicts 1 class(es) of its test split"
