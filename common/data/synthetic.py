"""A procedural, CXR-*like* image set for smoke tests and demos. Not medical data.

Each image is drawn from scratch from its own seed: a body outline, two dark lung fields with
curved rib texture, a bright mediastinum and heart shadow, global jitter (shift, scale,
brightness, contrast, noise). Classes differ by opacities painted into the lungs:

- ``normal``: clear lungs;
- ``pneumonia``: one dense, patchy opacity in one lung (lobar-consolidation-like);
- ``covid-19``: several hazy opacities in the lower, outer zones of *both* lungs
  (bilateral peripheral ground-glass-like).

These cartoons only mimic the gross appearance so that the whole pipeline (cache, splits,
partitions, federated training, distillation, export) can run end to end without any download
and a small CNN reaches high accuracy at 32-64 px within a few epochs. Nothing learned on them
says anything about real radiographs.

Images are produced in memory by :class:`SyntheticReader` (no files); a record's ``meta``
carries its image seed and site index, so the same (seed, index) always gives the same pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from common.data.catalog import ImageRecord

SYNTHETIC_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "covid-19")
GENERATOR_VERSION = "synthetic-cxr-v1"


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _blob(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))


def _ellipse(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float, edge: float
) -> np.ndarray:
    """Soft-edged ellipse mask in [0, 1]."""
    r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return np.clip((1.0 - r) / edge, 0.0, 1.0)


def render_synthetic_cxr(
    label: str, seed: int, size: int, site: int = 0, difficulty: float = 0.0
) -> np.ndarray:
    """Draw one synthetic CXR-like image of class ``label`` as a ``size`` x ``size`` uint8 array.

    ``difficulty`` in [0, 1] makes the classes overlap: opacities get fainter and smaller, the
    noise stronger, and benign look-alikes (soft-tissue shadows over the lungs, in any class)
    appear; 0 draws the original, easy images (pixel for pixel).
    """
    if label not in SYNTHETIC_CLASSES:
        raise ValueError(f"synthetic class must be one of {SYNTHETIC_CLASSES}, got {label!r}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"synthetic difficulty must be between 0 and 1, got {difficulty}")
    rng = np.random.default_rng(seed)
    # drawn from their own stream so that difficulty 0 leaves the original images untouched
    hard = np.random.default_rng([seed, 7919])
    faint = 1.0 - 0.7 * difficulty
    small = 1.0 - 0.35 * difficulty
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    # Global pose jitter: shift and scale the coordinate frame.
    scale = rng.uniform(0.92, 1.08)
    xx = (xx - rng.uniform(-0.06, 0.06)) / scale
    yy = (yy - rng.uniform(-0.06, 0.06)) / scale

    img = np.full((size, size), 0.06, dtype=np.float32)
    body = _ellipse(xx, yy, 0.0, 0.08, 0.9, 1.05, 0.15)
    img += 0.5 * body
    lungs = np.zeros_like(img)
    for side in (-1.0, 1.0):
        lungs = np.maximum(lungs, _ellipse(xx, yy, side * 0.4, -0.08, 0.3, 0.58, 0.25))
    img -= 0.34 * lungs
    # Curved ribs: bright bands inside the lungs, bending down towards the sides.
    rib_phase = (yy + 0.35 * xx**2) * rng.uniform(5.5, 7.0) * math.pi
    img += 0.07 * lungs * (0.5 + 0.5 * np.sin(rib_phase))
    img += 0.22 * _blob(xx, yy, 0.0, 0.0, 0.1, 1.2)  # spine / mediastinum
    img += 0.2 * _ellipse(xx, yy, 0.12, 0.32, 0.25, 0.2, 0.4)  # heart shadow

    texture = _smooth_noise(rng, size, 6)
    if label == "pneumonia":
        side = rng.choice([-1.0, 1.0])
        cx = side * rng.uniform(0.3, 0.5)
        cy = rng.uniform(0.0, 0.3)
        opacity = _blob(xx, yy, cx, cy, small * rng.uniform(0.16, 0.24), small * rng.uniform(0.16, 0.26))
        strength = faint * rng.uniform(0.45, 0.6)
        img += strength * opacity * (0.6 + 0.4 * texture) * np.clip(lungs * 1.5, 0, 1)
    elif label == "covid-19":
        haze = np.zeros_like(img)
        for side in (-1.0, 1.0):
            for _ in range(int(rng.integers(2, 4))):
                cx = side * rng.uniform(0.5, 0.65)
                cy = rng.uniform(-0.05, 0.4)
                haze = np.maximum(
                    haze,
                    _blob(xx, yy, cx, cy, small * rng.uniform(0.12, 0.2), small * rng.uniform(0.15, 0.25)),
                )
        strength = faint * rng.uniform(0.3, 0.4)
        img += strength * haze * (0.5 + 0.5 * texture) * np.clip(lungs * 1.5, 0, 1)
    if difficulty > 0:
        # benign look-alikes in every class: soft-tissue shadows over the lower lungs
        for _ in range(int(hard.integers(0, 3))):
            cx, cy = hard.uniform(-0.6, 0.6), hard.uniform(0.0, 0.45)
            shadow = _blob(xx, yy, cx, cy, hard.uniform(0.1, 0.22), hard.uniform(0.1, 0.2))
            img += difficulty * hard.uniform(0.1, 0.25) * shadow * np.clip(lungs * 1.5, 0, 1)

    # Site-dependent acquisition: each site's scanner has its own contrast and brightness.
    site_contrast = 1.0 + 0.08 * ((site % 5) - 2)
    contrast = rng.uniform(0.85, 1.15) * site_contrast
    brightness = rng.uniform(-0.05, 0.05) + 0.02 * ((site % 3) - 1)
    img = (img - 0.3) * contrast + 0.3 + brightness
    img += rng.normal(0.0, 0.025, size=img.shape).astype(np.float32)
    if difficulty > 0:
        img += hard.normal(0.0, 0.05 * difficulty, size=img.shape).astype(np.float32)
    return np.clip(img * 255.0, 0, 255).round().astype(np.uint8)


class SyntheticReader:
    """Renders synthetic records on demand; ``meta`` holds ``seed`` and ``site_index``."""

    def __init__(self, image_size: int, difficulty: float = 0.0) -> None:
        self.image_size = image_size
        self.difficulty = difficulty

    def read(self, record: ImageRecord) -> np.ndarray:
        return render_synthetic_cxr(
            record.source_labels[0],
            int(record.meta["seed"]),
            self.image_size,
            int(record.meta.get("site_index", "0")),
            self.difficulty,
        )

    def fingerprint(self, record: ImageRecord) -> str:
        hard = f":difficulty-{self.difficulty:g}" if self.difficulty > 0 else ""
        return (
            f"{GENERATOR_VERSION}:{self.image_size}:{record.source_labels[0]}:"
            f"{record.meta['seed']}:{record.meta.get('site_index', '0')}{hard}"
        )
