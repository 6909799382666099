"""The cross-site table and forest plot of an evaluation-only run (server/cross_site_report.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from common.protocol import WEIGHT_KEY
from server.cross_site import wanted_sites
from server.cross_site_report import site_row, write_cross_site_report, write_matrix_report

MODEL = {"name": "student.onnx", "description": "student.onnx: student (onnx)", "sha256": "ab" * 32}


def _metrics(auroc: float, low: float, high: float) -> dict[str, float]:
    return {
        WEIGHT_KEY: 120,
        "eval_auroc_macro": auroc,
        "eval_auroc_macro_low": low,
        "eval_auroc_macro_high": high,
        "eval_op_balanced_accuracy": 0.61,
        "eval_op_balanced_accuracy_low": 0.5,
        "eval_op_balanced_accuracy_high": 0.7,
        "eval_op_sensitivity_mean": 0.6,
        "eval_op_specificity_mean": 0.8,
        "eval_op_site_rule": 1,
    }


def test_table_json_and_forest_plot_hold_each_sites_figures_and_the_declines(tmp_path: Path) -> None:
    rows = [
        site_row("site-a", "ok", "", {**_metrics(0.82, 0.74, 0.9), "eval_auroc/normal": 0.9}),
        site_row("site-b", "ok", "", _metrics(0.67, 0.55, 0.78)),
        site_row("site-c", "declined", "the run has a evaluation phase, but ...", {}),
    ]
    table = write_cross_site_report(tmp_path / "eval", MODEL, rows)

    text = table.read_text()
    assert "| site-a | ok | 120 | 0.82 (0.74-0.90) | 0.61 (0.50-0.70) | 0.60 | 0.80 |" in text
    assert "| site-c | declined: the run has a evaluation phase" in text
    saved = json.loads((tmp_path / "eval" / "cross_site.json").read_text())
    assert [s["site"] for s in saved["sites"]] == ["site-a", "site-b", "site-c"]
    assert saved["sites"][0]["per_class"] == {"auroc/normal": 0.9}
    assert "per_class" not in saved["sites"][1]
    assert saved["model"]["sha256"] == MODEL["sha256"]
    with Image.open(tmp_path / "eval" / "forest_plot.png") as png:
        assert png.size[0] > 300
        assert png.size[1] > 100


def test_values_a_site_cannot_have_are_not_drawn_or_tabled(tmp_path: Path) -> None:
    row = site_row(
        "site-x", "ok", "", {**_metrics(7.0, -1.0, float("inf")), "eval_op_site_rule": 0, WEIGHT_KEY: "x"}
    )

    assert math.isnan(row["auroc_macro"]["value"])
    assert math.isnan(row["auroc_macro"]["low"])
    assert row["test_images"] is None
    text = write_cross_site_report(tmp_path / "eval", MODEL, [row]).read_text()
    assert "| site-x | ok |  | - | 0.61 (0.50-0.70) (argmax) |" in text


def test_site_selection_is_read_from_the_comma_separated_setting() -> None:
    assert wanted_sites(" site-a, ,site-b ") == ["site-a", "site-b"]
    assert wanted_sites("") == []


def test_the_matrix_has_a_row_per_shared_student_and_names_the_sites_that_kept_theirs(tmp_path: Path) -> None:
    rows = [
        {"student_of": "site-a", **site_row("site-b", "ok", "", _metrics(0.7, 0.6, 0.8))},
        {"student_of": "site-a", **site_row("site-c", "declined", "no evaluation phase", {})},
        {"student_of": "site-b", **site_row("site-a", "ok", "", _metrics(0.9, 0.85, 0.95))},
    ]
    kept = [{"site": "site-c", "reason": "a site under DP never sends its student"}]

    text = write_matrix_report(tmp_path, rows, kept).read_text()

    assert "| site-a |  | 0.70 (0.60-0.80) | declined |" in text
    assert "| site-b | 0.90 (0.85-0.95) |  |  |" in text
    assert "site-c kept its student: a site under DP never sends its student" in text
    saved = json.loads((tmp_path / "cross_site_matrix.json").read_text())
    assert [(r["student_of"], r["site"]) for r in saved["scores"]] == [
        ("site-a", "site-b"),
        ("site-a", "site-c"),
        ("site-b", "site-a"),
    ]
