"""Learning curves as inline SVG, drawn on the server: one chart per metric, one line per series.

Every point is an SVG ``circle`` with ``data-round`` and ``data-value`` inside a ``g`` with
``data-series`` (``_global`` for the global model, else the site's name), so that a person sees
the curve and a browser test can read it. Site names are escaped; nothing is scripted.
"""

from __future__ import annotations

from html import escape

from server.console.run_state import GLOBAL, Curve

WIDTH, HEIGHT = 340, 200
LEFT, RIGHT, TOP, BOTTOM = 46, 12, 12, 30
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
GLOBAL_COLOUR = "#111111"


def series_colours(names: list[str]) -> dict[str, str]:
    """A colour per series: black for the global model, the palette in order for the sites."""
    sites = sorted(n for n in names if n != GLOBAL)
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sites)}
    colours[GLOBAL] = GLOBAL_COLOUR
    return colours


def _bounds(curve: Curve) -> tuple[int, int, float, float]:
    points = [p for series in curve.series.values() for p in series]
    rounds = [r for r, _ in points] or [1]
    values = [v for _, v in points] or [0.0]
    low, high = min(values), max(values)
    if high - low < 1e-9:
        margin = max(abs(low) * 0.05, 0.01)
        low, high = low - margin, high + margin
    pad = (high - low) * 0.08
    return min(rounds), max(max(rounds), min(rounds) + 1), low - pad, high + pad


def _axes(first: int, last: int, low: float, high: float) -> list[str]:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}"/>',
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{high:.3g}</text>',
        f'<text class="tick" x="{LEFT - 4}" y="{bottom}" text-anchor="end">{low:.3g}</text>',
        f'<text class="tick" x="{(LEFT + right) / 2:.0f}" y="{HEIGHT - 4}" text-anchor="middle">round</text>',
    ]
    step = max(1, (last - first) // 8 + 1)
    for server_round in range(first, last + 1, step):
        x = _x(server_round, first, last)
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{bottom + 13}" text-anchor="middle">{server_round}</text>'
        )
    return parts


def _x(server_round: int, first: int, last: int) -> float:
    return LEFT + (server_round - first) / (last - first) * (WIDTH - LEFT - RIGHT)


def _y(value: float, low: float, high: float) -> float:
    return TOP + (high - value) / (high - low) * (HEIGHT - TOP - BOTTOM)


def svg_chart(curve: Curve, colours: dict[str, str]) -> str:
    """One chart: axes, then each series as a line with a dot per round."""
    first, last, low, high = _bounds(curve)
    parts = _axes(first, last, low, high)
    # the sites first, the global model last (drawn on top)
    for name, points in sorted(curve.series.items(), key=lambda item: item[0] == GLOBAL):
        colour = colours.get(name, PALETTE[0])
        label = "global" if name == GLOBAL else name
        coords = [(_x(r, first, last), _y(v, low, high), r, v) for r, v in points]
        width = 2.5 if name == GLOBAL else 1.5
        group = [f'<g class="series" data-series="{escape(name)}">']
        if len(coords) > 1:
            line = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in coords)
            group.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="{width}"/>')
        for x, y, server_round, value in coords:
            group.append(
                f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}" '
                f'data-round="{server_round}" data-value="{value:.6g}">'
                f"<title>{escape(label)}, round {server_round}: {value:.4g}</title></circle>"
            )
        parts += [*group, "</g>"]
    return (
        f'<svg class="chart" data-curve="{escape(curve.title)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(curve.title)} per round">'
        + "".join(parts)
        + "</svg>"
    )
