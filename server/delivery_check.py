"""The check before delivery, as the coordinator sees it: one verdict per site, from its reply.

After the student phase every site scores the global teacher and the student it delivers on its
own test split, at its own operating point (fitted on its validation split), and replies with
figures only (``teacher_op_balanced_accuracy``, ``student_op_balanced_accuracy``,
``student_op_never_predicted``, ``delivery_check_ok``, per-class ``student_op_sensitivity/<c>``
where it opted in, besides ``teacher_auroc_macro`` / ``student_auroc_macro``). A student is
**unfit** when its balanced accuracy at the operating point is more than :data:`UNFIT_MARGIN`
below the teacher's, or when it never predicts a class present in the test split.

The rows come from another machine: every figure is read as untrusted (a non-number is "n/a"),
a site's own ``delivery_check_ok`` (computed on exact figures) decides over the coordinator's
reading of rounded ones, and a site whose phase failed is listed as failed. Used by the
coordinator's summary (server/reporting.py) and the simulation's report (simulation/report.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from common.markdown import table_lines

UNFIT_MARGIN = 0.05
CHECK_PHASES = ("student-final", "distill")
"""Where the check is read: the federated student's final message if it ran, else distillation
(then each site delivers the student it distilled)."""
FIGURES = (
    "teacher_auroc_macro",
    "student_auroc_macro",
    "teacher_op_balanced_accuracy",
    "student_op_balanced_accuracy",
)
NOT_AVAILABLE = "n/a"


def figure(row: dict[str, Any], key: str) -> float | None:
    """A finite number from a site's row, or None (missing, NaN, or not a number)."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def check_rows(rows: Iterable[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The phase whose student each site delivers, and its rows (``("", [])`` if none ran)."""
    rows = list(rows)
    for phase in CHECK_PHASES:
        selected = [r for r in rows if r.get("phase") == phase]
        if selected:
            return phase, selected
    return "", []


def never_predicted_classes(row: dict[str, Any]) -> list[str]:
    """Classes the student never chose, where the site sent per-class figures: sensitivity 0 on
    the class's images and specificity 1 (no other image got it either)."""
    prefix = "student_op_sensitivity/"
    names = []
    for key in sorted(k for k in row if isinstance(k, str) and k.startswith(prefix)):
        name = key[len(prefix) :]
        specificity = figure(row, f"student_op_specificity/{name}")
        if figure(row, key) == 0.0 and specificity in (None, 1.0):
            names.append(name)
    return names


def _reasons(entry: dict[str, Any]) -> list[str]:
    reasons = []
    teacher, student = entry["teacher_op_balanced_accuracy"], entry["student_op_balanced_accuracy"]
    if teacher is not None and student is not None and teacher - student > UNFIT_MARGIN + 1e-12:
        reasons.append(
            f"balanced accuracy {student:.3f} vs the teacher's {teacher:.3f} "
            f"({teacher - student:.3f} below, limit {UNFIT_MARGIN:g})"
        )
    if entry["never_predicted"]:
        named = entry["never_predicted_classes"]
        reasons.append(
            "never predicts " + ", ".join(named)
            if named
            else f"never predicts {entry['never_predicted']} class(es) of its test split"
        )
    return reasons


def _site_verdict(entry: dict[str, Any], site_ok: float | None, reasons: list[str]) -> tuple[str, str]:
    if site_ok == 0.0:  # the site's check, on exact figures, decides
        return "unfit", "; ".join(reasons) or "the site's own check failed (the figures here are rounded)"
    if site_ok == 1.0:  # a count is never rounded: a class never predicted is unfit whatever the site says
        never = [r for r in reasons if r.startswith("never predicts")]
        return ("unfit", "; ".join(never)) if never else ("fit", "")
    if entry["teacher_op_balanced_accuracy"] is None or entry["student_op_balanced_accuracy"] is None:
        return NOT_AVAILABLE, "the site sent no check (an older site, or no operating point)"
    return ("unfit", "; ".join(reasons)) if reasons else ("fit", "")


def site_check(row: dict[str, Any]) -> dict[str, Any]:
    """One site's entry: its figures (None where missing), ``verdict`` (fit | unfit | failed |
    n/a) and ``reason``."""
    entry: dict[str, Any] = {"site": str(row.get("site", "?")), "status": str(row.get("status", "?"))}
    entry.update({key: figure(row, key) for key in FIGURES})
    never = figure(row, "student_op_never_predicted")
    names = never_predicted_classes(row)
    if never is None or never < 0:
        entry["never_predicted"] = len(names) if names else None
    else:
        entry["never_predicted"] = int(never)
    # names read from (possibly rounded) per-class figures: shown where they agree with the count
    entry["never_predicted_classes"] = names if len(names) == entry["never_predicted"] else []
    if entry["status"] != "ok":
        entry["verdict"] = "failed"
        entry["reason"] = str(row.get("reason") or entry["status"])
        return entry
    entry["verdict"], entry["reason"] = _site_verdict(
        entry, figure(row, "delivery_check_ok"), _reasons(entry)
    )
    return entry


def delivery_check(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The whole check (summary.json's ``delivery_check``, results.json's too) from a run's metrics
    rows. A site seen in an earlier phase but absent from the checked one failed there."""
    rows = list(rows)
    phase, selected = check_rows(rows)
    seen = {str(r.get("site")) for r in rows if r.get("phase") in CHECK_PHASES and "site" in r}
    missing = seen - {str(r.get("site")) for r in selected}
    selected += [{"site": s, "status": "failed", "reason": f"no reply in the {phase} phase"} for s in missing]
    sites = [site_check(r) for r in sorted(selected, key=lambda r: str(r.get("site", "")))]
    counts = {
        v: sum(1 for s in sites if s["verdict"] == v) for v in ("fit", "unfit", "failed", NOT_AVAILABLE)
    }
    return {
        "phase": phase,
        "unfit_margin": UNFIT_MARGIN,
        "sites": sites,
        "fit": counts["fit"],
        "unfit": counts["unfit"],
        "failed": counts["failed"],
        "unchecked": counts[NOT_AVAILABLE],
        "all_fit": bool(sites) and counts["fit"] == len(sites),
    }


def _cell(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.3f}"


def _text(value: Any) -> str:
    """Text from a site, safe inside one markdown table cell."""
    return " ".join(str(value).replace("|", "/").split())


def _flag(entry: dict[str, Any]) -> str:
    verdict = entry["verdict"]
    if verdict == "fit":
        return "fit"
    if verdict == NOT_AVAILABLE:
        return NOT_AVAILABLE
    return f"**{verdict.upper()}**: {_text(entry['reason'])}"


def _never_cell(entry: dict[str, Any]) -> str:
    count, names = entry["never_predicted"], entry["never_predicted_classes"]
    if count is None:
        return NOT_AVAILABLE
    return f"{count} ({', '.join(_text(n) for n in names)})" if names else str(count)


def check_markdown(check: dict[str, Any]) -> list[str]:
    """The "Check before delivery" section (markdown lines; empty when no student phase ran)."""
    if not check.get("sites"):
        return []
    lines = [
        "## Check before delivery",
        "",
        "Each site scored the global teacher and the student it delivers on its own test split, at its "
        "own operating point (fitted on its validation split). **UNFIT**: the student's balanced "
        f"accuracy there is more than {check['unfit_margin']:g} below the teacher's, or it never "
        "predicts a class present in the test split. A failed site counts as a miss.",
        "",
    ]
    header = ["site", "teacher macro-AUROC", "student macro-AUROC", "teacher balanced acc. (op)"]
    header += ["student balanced acc. (op)", "classes never predicted", "check"]
    rows = [
        [_text(s["site"]), *(_cell(s[k]) for k in FIGURES), _never_cell(s), _flag(s)] for s in check["sites"]
    ]
    lines += table_lines(header, rows, align="lrrrr")
    lines += [
        "",
        f"{check['fit']} of {len(check['sites'])} site(s) fit; {check['unfit']} unfit, {check['failed']} "
        f"failed, {check['unchecked']} without a check.",
    ]
    return lines
