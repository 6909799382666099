"""Plots of the real-data study (matplotlib Agg canvas, no display needed); one PNG per function."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulation.plots import colours


def _figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _value(v: float | None) -> float:
    return math.nan if v is None else float(v)


def plot_splits(
    rows: Sequence[tuple[str, float | None, float | None, float | None, float | None]], path: Path
) -> Path:
    """Grouped bars per split: pooled, best local-only, FedAvg and FedProx macro-AUROC."""
    fig, ax = _figure()
    names = ("pooled", "best local-only", "FedAvg", "FedProx")
    palette = colours(len(names))
    x = np.arange(len(rows))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        values = [_value(row[1 + j]) for row in rows]
        ax.bar(x + (j - 1.5) * width, values, width, label=name, color=palette[j])
    ax.set_xticks(x, [row[0] for row in rows])
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylabel("held-out macro-AUROC")
    ax.set_title("Teachers by split")
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def plot_students(rows: Sequence[tuple[str, float, float]], teacher: float, path: Path) -> Path:
    """Per-site bars of the KD and no-KD students, with the teacher as a line."""
    fig, ax = _figure()
    palette = colours(2)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[1] for r in rows], 0.4, label="KD student", color=palette[0])
    ax.bar(x + 0.2, [r[2] for r in rows], 0.4, label="no-KD student", color=palette[1])
    if not math.isnan(teacher):
        ax.axhline(teacher, color="black", linewidth=1.0, linestyle="--", label="FedAvg teacher")
    ax.set_xticks(x, [r[0] for r in rows])
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("held-out macro-AUROC")
    ax.set_title("MobileNetV2 students per site")
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


def plot_privacy(points: Sequence[tuple[float, float, float]], path: Path) -> Path:
    """Macro-AUROC against the target epsilon (no DP drawn at the right end), with seed spread."""
    fig, ax = _figure(6.0, 4.0)
    finite = sorted(p for p in points if math.isfinite(p[0]))
    labels = [f"{p[0]:g}" for p in finite]
    values = [p[1] for p in finite]
    spread = [0.0 if math.isnan(p[2]) else p[2] for p in finite]
    if any(not math.isfinite(p[0]) for p in points):
        ref = next(p for p in points if not math.isfinite(p[0]))
        labels.append("no DP")
        values.append(ref[1])
        spread.append(0.0 if math.isnan(ref[2]) else ref[2])
    x = np.arange(len(labels))
    ax.errorbar(x, values, yerr=spread, marker="o", capsize=4)
    ax.set_xticks(x, labels)
    ax.set_xlabel("target epsilon (delta 1e-5)")
    ax.set_ylabel("held-out macro-AUROC")
    ax.set_ylim(0.4, 1.0)
    ax.set_title("Cost of DP-SGD at every site")
    return _save(fig, path)
