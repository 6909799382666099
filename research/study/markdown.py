"""Small pieces the study's markdown is made of: a mean with its spread over seeds, and a table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    def text(self, digits: int = 3) -> str:
        if not self.values:
            return "–"
        if len(self.values) == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f} (n={len(self.values)})"


def stat(values: Iterable[float | None]) -> Stat:
    return Stat(tuple(v for v in values if v is not None and not math.isnan(v)))


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> list[str]:
    spec = align or "|".join("---" if i == 0 else "---:" for i in range(len(header)))
    return [
        "| " + " | ".join(header) + " |",
        "|" + spec + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
