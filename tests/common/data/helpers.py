"""Helpers writing tiny images and CSVs for the data tests."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(
    path: Path, value: int = 128, size: tuple[int, int] = (24, 20), seed: int | None = None
) -> Path:
    """A small greyscale image; distinct ``seed`` gives distinct pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        pixels = np.full((size[1], size[0]), value, dtype=np.uint8)
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path
