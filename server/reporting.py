"""Human-facing outputs of a run folder: learning curves (PNG), summary.json and summary.md
(with the check before delivery of server/delivery_check.py).

Every figure is read with ``row.get``: sites send different metrics (a site under its own DP
sends no training loss, a site that did not opt in to per-class metrics sends fewer scores),
so any key may be missing from any row, or from every row of a run.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from common.jsonio import write_json
from common.markdown import table_lines
from common.run_settings import FederatedRunConfig
from server.delivery_check import check_markdown, delivery_check
from server.run_folder import RunFolder

logger = logging.getLogger(__name__)

DISTILL_COLUMNS = ("accuracy", "balanced_accuracy", "auroc_macro", "f1_macro")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _finite_or_nan(value: Any) -> float:
    return float(value) if _finite(value) else math.nan


def global_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r.get("phase") == "aggregate"), key=lambda r: int(r["round"]))


def write_learning_curves(folder: RunFolder, selection_metric: str) -> None:
    """Aggregate train loss and the federated validation metric per round, as a PNG."""
    rows = global_rows(folder.read_metrics())
    if not rows:
        return
    rounds = [int(r["round"]) for r in rows]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    # Sites send different keys (a site under DP sends no training loss): plot what was sent.
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        if any(_finite(r.get(key)) for r in rows):
            ax_loss.plot(rounds, [_finite_or_nan(r.get(key)) for r in rows], marker="o", label=label)
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("loss (weighted mean over the sites that sent it)")
    if ax_loss.lines:
        ax_loss.legend()
    key = f"val_{selection_metric}"
    ax_metric.plot(rounds, [_finite_or_nan(r.get(key)) for r in rows], marker="o", color="tab:green")
    ax_metric.set_xlabel("round")
    ax_metric.set_ylabel(f"federated validation {selection_metric}")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        ax.set_xticks(rounds)
    fig.suptitle("Global teacher learning curves")
    fig.tight_layout()
    fig.savefig(folder.learning_curves_path, dpi=110)
    plt.close(fig)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if _finite(value) else "-"


def _summary_tables(
    aggregates: list[dict[str, Any]],
    epsilon: dict[str, float],
    distill_rows: list[dict[str, Any]],
    metric: str,
) -> list[str]:
    """The summary's tables: rounds, DP epsilon per site (if any), distillation per site (if any)."""
    lines: list[str] = []
    rounds = [
        [
            r["round"],
            f"{r.get('sites_trained', '-')}/{r.get('sites_sampled', '-')}",
            _fmt(r.get("train_loss")),
            _fmt(r.get("val_loss")),
            _fmt(r.get("val_" + metric)),
            _fmt(r.get("seconds")),
        ]
        for r in aggregates
    ]
    lines += table_lines(
        ["round", "sites trained", "train loss", "val loss", f"val {metric}", "s"], rounds, "rrrrrr"
    )
    if epsilon:
        lines.append("")
        lines += table_lines(
            ["site", "DP epsilon spent"],
            [[site, f"{eps:.3f}"] for site, eps in sorted(epsilon.items())],
            "lr",
        )
    if distill_rows:
        header = [
            "site",
            "status",
            *(f"{who} {c}" for c in DISTILL_COLUMNS for who in ("teacher", "student")),
        ]
        distilled = [
            [row.get("site"), row.get("status")]
            + [_fmt(row.get(f"{who}_{c}")) for c in DISTILL_COLUMNS for who in ("teacher", "student")]
            for row in distill_rows
        ]
        lines.append("")
        lines += table_lines(header, distilled, "ll" + "r" * (2 * len(DISTILL_COLUMNS)))
    return lines


def selected_by(settings: FederatedRunConfig) -> str:
    """What picked the delivered teacher, in words."""
    return "the coordinator's hold-out" if settings.run.select_on == "coordinator" else "federated validation"


def write_summary(
    folder: RunFolder,
    *,
    settings: FederatedRunConfig,
    strategy: str,
    best_round: int,
    distill_rows: list[dict[str, Any]],
    seconds: float,
    federated_student: str = "",
    students_start: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rows = folder.read_metrics()
    aggregates = global_rows(rows)
    last = aggregates[-1] if aggregates else {}
    # round 0: the initial teacher, a candidate when the coordinator selects on its hold-out
    candidates = [r for r in rows if r.get("phase") == "start" and r.get("site") == "_global"] + aggregates
    best = next((r for r in candidates if int(r["round"]) == best_round), {})
    epsilon: dict[str, float] = {}
    for row in rows:
        if row.get("phase") == "train" and _finite(row.get("dp_epsilon")):
            epsilon[str(row["site"])] = float(row["dp_epsilon"])
    summary = {
        "task": settings.task.name,
        "teacher": settings.teacher.name,
        "strategy": strategy,
        "rounds_completed": int(last.get("round", 0)),
        "best_round": best_round,
        "selection_metric": settings.run.selection_metric,
        "selected_on": settings.run.select_on,
        "best_validation": {k: v for k, v in best.items() if k.startswith("val_")},
        "best_central": {k: v for k, v in best.items() if k.startswith("central_")},
        "last_validation": {k: v for k, v in last.items() if k.startswith("val_")},
        "dp_epsilon_spent": epsilon,
        "distillation": distill_rows,
        "federated_student": federated_student,
        "students_start": students_start,
        "delivery_check": delivery_check(rows),
        "seconds": seconds,
    }
    write_json(folder.summary_path, summary)

    lines = [
        f"# Run summary: {settings.task.name}, teacher {settings.teacher.name}, {strategy}",
        "",
        f"Rounds completed: {summary['rounds_completed']}; best round by {selected_by(settings)} "
        f"{settings.run.selection_metric}: {best_round}{' (the initial teacher)' * (best_round == 0)}.",
        "",
    ]
    lines += _summary_tables(aggregates, epsilon, distill_rows, settings.run.selection_metric)
    if students_start:
        lines += [
            "",
            f"Students' start: distilled at the coordinator on {students_start['images']} public images "
            f"({students_start['epochs']} epochs, {students_start['seconds']:.0f} s); its top class is the "
            f"teacher's on {100 * students_start['agreement_with_teacher']:.1f}% of held-out public images.",
        ]
    if federated_student:
        lines += ["", f"Federated student: {federated_student}."]
    check = check_markdown(summary["delivery_check"])
    if check:
        lines += ["", *check]
    folder.summary_markdown_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary
