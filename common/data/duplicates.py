"""Duplicate images within and across sources, by content hash, with a report and a drop option.

Two levels:

- ``exact``: the SHA-1 of each image's decoded pixels at native resolution, recorded by the
  image cache. Catches byte-identical files and the same pixels saved under another name or
  format (PNG vs BMP, JPEG copied as is). It does *not* catch an image re-encoded with a lossy
  codec (JPEG at another quality changes pixel values).
- ``near``: a 64-bit difference hash (dHash) of the cached, resized image: a 9 x 8 thumbnail,
  one bit per horizontal gradient sign. Equal hashes flag re-encoded or resized copies; they
  also flags genuinely different images: on the shared Kermany + COVID-19 Radiography sets
  (12,063 images at 64 px) it grouped 1,200 images into 647 groups, many of them different
  patients and classes. Use it for review only, never to drop automatically.

Measured on the shared real data: 52 groups / 68 redundant images are pixel-identical, all
inside Kermany and all pairs of one patient (e.g. ``person124_virus_246`` = ``..._247``), so the
patient-grouped split already keeps them on one side; no exact duplicate crosses Kermany and
the COVID-19 Radiography subset (its normals come from RSNA, and the database's Kermany-derived
``Viral Pneumonia`` class is not in the subset).

:func:`find_duplicates` groups cache rows with equal hashes; :meth:`DuplicateReport.keep_rows`
keeps the first row of each group (drop the rest before splitting, so that no test image has
a copy in training).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from common.data.cache import CachedImages
from common.errors import ConfigError

logger = logging.getLogger(__name__)

Level = Literal["exact", "near"]


def dhash(image: np.ndarray) -> int:
    """64-bit difference hash of a 2-D uint8 image."""
    thumb = np.asarray(
        Image.fromarray(image, mode="L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16
    )
    bits = (thumb[:, 1:] > thumb[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


@dataclass(frozen=True)
class DuplicateReport:
    """Groups of cache rows holding the same image (each group has two or more rows)."""

    level: Level
    groups: tuple[tuple[int, ...], ...]
    n_images: int

    @property
    def n_duplicates(self) -> int:
        """Rows that would be dropped (all but the first of each group)."""
        return sum(len(g) - 1 for g in self.groups)

    def drop_rows(self) -> np.ndarray:
        return np.asarray(sorted(r for g in self.groups for r in g[1:]), dtype=np.int64)

    def keep_rows(self) -> np.ndarray:
        mask = np.ones(self.n_images, dtype=bool)
        mask[self.drop_rows()] = False
        return np.flatnonzero(mask)

    def cross_source_groups(self, cached: CachedImages) -> list[tuple[int, ...]]:
        """Groups whose rows come from more than one source."""
        records = cached.catalog.records
        return [g for g in self.groups if len({records[r].source for r in g}) > 1]

    def summary(self, cached: CachedImages, limit: int = 10) -> str:
        records = cached.catalog.records
        lines = [
            f"{len(self.groups)} groups of {self.level} duplicates, {self.n_duplicates} redundant images "
            f"of {self.n_images} ({len(self.cross_source_groups(cached))} groups across sources)"
        ]
        for g in self.groups[:limit]:
            lines.append("  " + " = ".join(f"{records[r].source}:{records[r].key}" for r in g))
        return "\n".join(lines)


def find_duplicates(cached: CachedImages, *, level: Level = "exact") -> DuplicateReport:
    """Group the cache's rows by content hash at ``level`` ('exact' or 'near')."""
    if level == "exact":
        keys: list[object] = list(cached.pixel_hashes)
    elif level == "near":
        keys = [dhash(np.asarray(cached.images[i])) for i in range(len(cached))]
    else:
        raise ConfigError("duplicate level", level, "exact or near")
    by_key: dict[object, list[int]] = defaultdict(list)
    for row, key in enumerate(keys):
        by_key[key].append(row)
    groups = tuple(tuple(rows) for rows in by_key.values() if len(rows) > 1)
    report = DuplicateReport(level, groups, len(cached))
    if groups:
        logger.info("%s", report.summary(cached, limit=3))
    return report
