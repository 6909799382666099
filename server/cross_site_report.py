"""The cross-site table of an evaluation-only run: ``cross_site.json``, ``cross_site.md`` and
``forest_plot.png`` (each site's AUROC with its 95% bootstrap interval).

The rows are what each site's reply carried (client/model_evaluation.py, shaped by
client/disclosure.py: coarse at deployed sites), or why a site gave none (declined, failed, no
reply). Every figure is read with ``row.get``: a site that did not opt in to per-class metrics
sends none, and any figure may be NaN (a class absent from a site's test split). Site values
are untrusted: only finite numbers in [0, 1] are drawn. No Flower imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.jsonio import write_json, write_text_atomic
from common.markdown import table_lines
from common.protocol import WEIGHT_KEY

REPORT_FILES = ("cross_site.json", "cross_site.md", "forest_plot.png")
PREFIX = "eval_"


def _figure(row: Mapping[str, Any], key: str) -> float:
    value = row.get(PREFIX + key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else math.nan


def site_row(site: str, status: str, reason: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One site's row of the table: its figures (NaN where it sent none) and per-class figures."""
    count = metrics.get(WEIGHT_KEY)
    row: dict[str, Any] = {
        "site": site,
        "status": status,
        "reason": reason,
        "test_images": int(count) if isinstance(count, int | float) and math.isfinite(count) else None,
        "auroc_macro": {k: _figure(metrics, f"auroc_macro{s}") for k, s in _INTERVAL},
        "balanced_accuracy": {k: _figure(metrics, f"op_balanced_accuracy{s}") for k, s in _INTERVAL},
        "sensitivity_mean": _figure(metrics, "op_sensitivity_mean"),
        "specificity_mean": _figure(metrics, "op_specificity_mean"),
        "at_site_operating_point": metrics.get(PREFIX + "op_site_rule") == 1,
    }
    per_class = {
        key[len(PREFIX) :]: _figure(metrics, key[len(PREFIX) :])
        for key in sorted(metrics)
        if key.startswith(PREFIX) and "/" in key
    }
    if per_class:
        row["per_class"] = per_class
    return row


_INTERVAL = (("value", ""), ("low", "_low"), ("high", "_high"))


def _interval(figures: Mapping[str, float]) -> str:
    if math.isnan(figures["value"]):
        return "-"
    if math.isnan(figures["low"]) or math.isnan(figures["high"]):
        return f"{figures['value']:.2f}"
    return f"{figures['value']:.2f} ({figures['low']:.2f}-{figures['high']:.2f})"


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def markdown(model: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        f"# Cross-site evaluation of {model.get('name', 'the model')}",
        "",
        f"Model: {model.get('description', '')}; sha256 `{model.get('sha256', '')}`.",
        "Each site scored it on its own labelled test split (macro AUROC with its 95% bootstrap "
        "interval; balanced accuracy, mean sensitivity and specificity at the site's own operating "
        "point, fitted on its validation split). Figures as the sites sent them (deployed sites: "
        "two significant digits, test images in steps of at least 10).",
        "",
    ]
    header = ["site", "status", "test images", "AUROC (95% CI)", "balanced accuracy (95% CI)"]
    lines += table_lines([*header, "sensitivity", "specificity"], [_site_cells(row) for row in rows])
    lines += ["", "Forest plot: `forest_plot.png`.", ""]
    return "\n".join(lines)


def _site_cells(row: Mapping[str, Any]) -> list[str]:
    if row["status"] != "ok":
        return [row["site"], f"{row['status']}: {row['reason']}", "", "", "", "", ""]
    images = "" if row["test_images"] is None else str(row["test_images"])
    rule = "" if row["at_site_operating_point"] else " (argmax)"
    return [
        row["site"],
        "ok",
        images,
        _interval(row["auroc_macro"]),
        f"{_interval(row['balanced_accuracy'])}{rule}",
        _number(row["sensitivity_mean"]),
        _number(row["specificity_mean"]),
    ]


def forest_plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Each site's AUROC (point) with its 95% interval (bar); sites without one are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in rows if r["status"] == "ok" and not math.isnan(r["auroc_macro"]["value"])]
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.45 * max(1, len(drawn))))
    for y, row in enumerate(reversed(drawn)):
        figures = row["auroc_macro"]
        ax.plot([figures["value"]], [y], marker="s", color="tab:blue")
        if not (math.isnan(figures["low"]) or math.isnan(figures["high"])):
            ax.plot([figures["low"], figures["high"]], [y, y], color="tab:blue")
    ax.set_yticks(range(len(drawn)), [r["site"] for r in reversed(drawn)])
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(-0.7, max(1, len(drawn)) - 0.3)
    ax.set_xlabel("macro AUROC on the site's test split (95% bootstrap CI)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    try:
        fig.savefig(partial, dpi=110)
        partial.replace(path)
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)


def write_cross_site_report(out: Path, model: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write the three files into ``out`` (made if missing); returns the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cross_site.json", {"model": dict(model), "sites": [dict(r) for r in rows]})
    text = markdown(model, rows)
    write_text_atomic(out / "cross_site.md", text)
    forest_plot(rows, out / "forest_plot.png", f"{model.get('name', 'model')} at every site")
    return out / "cross_site.md"


def _matrix_markdown(rows: Sequence[Mapping[str, Any]], kept: Sequence[Mapping[str, str]]) -> str:
    lines = [
        "# Cross-site matrix of the delivered students",
        "",
        "Each shared student scored at every other site on that site's test split: macro AUROC "
        "(95% bootstrap interval). Only sites that opted in (`--share-delivered-student`) and do "
        "not train under DP share their student.",
        "",
    ]
    students = sorted({str(r["student_of"]) for r in rows})
    sites = sorted({str(r["site"]) for r in rows})
    if students:
        matrix = []
        for student in students:
            cells = [student]
            for site in sites:
                match = [r for r in rows if r["student_of"] == student and r["site"] == site]
                if not match:
                    cells.append("")
                elif match[0]["status"] != "ok":
                    cells.append(str(match[0]["status"]))
                else:
                    cells.append(_interval(match[0]["auroc_macro"]))
            matrix.append(cells)
        lines += table_lines(["student of \\ scored at", *sites], matrix)
    if kept:
        lines.append("")
    for keeper in kept:
        lines.append(f"- {keeper['site']} kept its student: {keeper['reason']}")
    return "\n".join(lines) + "\n"


def write_matrix_report(
    out: Path, rows: Sequence[Mapping[str, Any]], kept: Sequence[Mapping[str, str]]
) -> Path:
    """``cross_site_matrix.json`` and ``.md`` in ``out``; returns the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "cross_site_matrix.json", {"scores": [dict(r) for r in rows], "kept": [dict(k) for k in kept]}
    )
    write_text_atomic(out / "cross_site_matrix.md", _matrix_markdown(rows, kept))
    return out / "cross_site_matrix.md"
