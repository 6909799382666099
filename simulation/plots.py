"""Plots of simulation results, drawn off-screen (matplotlib Agg canvas, no display needed).

This module owns the figures written into partition and report folders. Each function takes plain
numbers (no catalog, no Flower objects) and writes one PNG.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def plot_label_distribution(
    counts: np.ndarray,
    *,
    site_names: Sequence[str],
    label_names: Sequence[str],
    path: Path,
    title: str = "",
) -> Path:
    """Stacked bars: one bar per site, one colour per label, bar height = images at the site.

    ``counts`` is ``[num_sites, num_labels]``. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    if counts.shape != (len(site_names), len(label_names)):
        raise ValueError(f"counts {counts.shape} != {len(site_names)} sites x {len(label_names)} labels")
    width = min(18.0, 4.0 + 0.8 * len(site_names))
    fig = Figure(figsize=(width, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    palette = colours(len(label_names))
    x = np.arange(len(site_names))
    bottom = np.zeros(len(site_names))
    for j, name in enumerate(label_names):
        ax.bar(x, counts[:, j], bottom=bottom, color=palette[j], label=name, width=0.8)
        bottom += counts[:, j]
    many = len(site_names) > 6
    ax.set_xticks(x, list(site_names), rotation=45 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("images")
    ax.set_xlabel("site")
    if title:
        ax.set_title(title)
    ax.legend(title="label", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    logger.debug("wrote %s", path)
    return path


def colours(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
