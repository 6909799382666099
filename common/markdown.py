"""The one writer of markdown tables for every report of the project.

Reports (a site's evaluation and model card, the compression table, the run settings of the
tracker, the coordinator's summaries, the simulation's report and partition table) format their
own cells; this module only lays them out, always the same way::

    | model | size MB |
    |---|---:|
    | teacher | 42.00 |

A column is aligned by one letter of ``align``: ``l`` left (the default for columns it does not
name), ``r`` right (numbers), ``c`` centred. Cells are written as given (``str`` of each); a cell
that may hold ``|`` must be escaped by its caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_SEPARATORS = {"l": "---", "r": "---:", "c": ":---:"}


def table_lines(headers: Sequence[object], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """The lines of a table: header, alignment row, then one line per row (no trailing newline).

    Raises:
        ValueError: ``align`` names more columns than there are, or a letter other than l, r, c;
            a row has another number of cells than ``headers``.
    """
    if len(align) > len(headers) or set(align) - set(_SEPARATORS):
        raise ValueError(
            f"align {align!r}: at most {len(headers)} letters, each l (left), r (right) or c (centre)"
        )
    separators = [_SEPARATORS[a] for a in align.ljust(len(headers), "l")]
    lines = [_line(headers), "|" + "|".join(separators) + "|"]
    for number, row in enumerate(rows, start=1):
        if len(row) != len(headers):
            raise ValueError(f"row {number} has {len(row)} cells, the header {len(headers)}")
        lines.append(_line(row))
    return lines


def table(headers: Sequence[object], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """The table as one string (lines joined by newlines, no trailing newline)."""
    return "\n".join(table_lines(headers, rows, align))


def _line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
