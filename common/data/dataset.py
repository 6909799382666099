"""A torch Dataset over the memory-mapped image cache, with augmentation on the cached arrays.

:class:`CxrDataset` yields ``(image, target)``: ``image`` a float32 tensor [1, S, S] normalised
with :data:`NORMALISATION`, ``target`` the float32 label vector [C] (one-hot or 1/0/NaN).
Nothing here decodes an image file: pixels come from :class:`~common.data.cache.CachedImages`.

Normalisation is fixed, not estimated from data: ``x = (pixel / 255 - 0.5) / 0.25``. Every site
and the exported ONNX preprocessing use the same two numbers without exchanging any statistic
of their images (the mean grey level of CXRs sits near 0.5 and the spread near 0.25, so the
inputs land roughly in [-2, 2]).

Augmentation (``augment=True``), applied per sample with a generator seeded by
(seed, epoch, index), so runs are reproducible whatever the number of loader workers:

- a small random affine (rotation up to ``max_rotation`` degrees, scale within
  ``1 +/- max_scale``, translation up to ``max_shift`` of the side), bilinear, zero padding at
  the (black) border;
- brightness and contrast jitter (``+/- intensity``) and a random gamma in
  ``[1 - intensity, 1 + intensity]``;
- horizontal flip only if ``hflip_probability > 0``. Off by default: in a frontal CXR the heart
  sits on the patient's left, and a flipped image shows a situs the model should not learn as
  normal; some works flip anyway for more data, so it is an option.

Call :meth:`CxrDataset.set_epoch` at the start of each epoch for fresh augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common.data.cache import CachedImages
from common.data.preprocess import equalize_images

NORMALISATION: dict[str, float] = {"mean": 0.5, "std": 0.25}
"""Applied after scaling pixels to [0, 1]; exported in the ONNX preprocessing JSON."""


def normalise(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [..., S, S] -> float32 normalised tensor (the same as the dataset and export use)."""
    tensor = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    return (tensor.float() / 255.0 - NORMALISATION["mean"]) / NORMALISATION["std"]


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation; the defaults are mild on purpose for CXRs."""

    max_rotation: float = 7.0
    max_scale: float = 0.08
    max_shift: float = 0.06
    intensity: float = 0.12
    hflip_probability: float = 0.0

    def __post_init__(self) -> None:
        from common.errors import ConfigError

        for name in ("max_rotation", "max_scale", "max_shift", "intensity"):
            if getattr(self, name) < 0:
                raise ConfigError(name.replace("_", "-"), getattr(self, name), "a number >= 0")
        if not 0.0 <= self.hflip_probability <= 1.0:
            raise ConfigError("hflip-probability", self.hflip_probability, "a number in [0, 1]")


AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "default": AugmentConfig(),
    # stronger geometry and intensity jitter (run setting ``augment = "strong"``), known to make
    # a CXR classifier lean less on the look of one source
    "strong": AugmentConfig(max_rotation=15.0, max_scale=0.15, max_shift=0.10, intensity=0.30),
}
"""The ``augment`` run setting's choices."""


class CxrDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images ``indices`` of a cache with their targets; optional seeded augmentation.

    Args:
        cached: the cache built for the catalog (rows align with ``cached.catalog``).
        indices: rows of the cache this dataset serves (e.g. a split's train indices).
        targets: label vectors aligned with the *cache rows* ([len(cached), C]); None uses
            ``cached.catalog.targets``. Soft targets (teacher probabilities) work as well.
        augment: apply the augmentations described in the module docstring.
        seed: seeds the augmentation generator (together with epoch and index).
        config: augmentation strengths.
        equalize: histogram-equalise each image before augmentation
            (:func:`common.data.preprocess.equalize_images`; the ``preprocess-equalize`` setting).
    """

    def __init__(
        self,
        cached: CachedImages,
        indices: Sequence[int] | np.ndarray,
        targets: np.ndarray | None = None,
        *,
        augment: bool = False,
        seed: int = 0,
        config: AugmentConfig | None = None,
        equalize: bool = False,
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        n = len(cached)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise IndexError(f"indices must lie in [0, {n}) (rows of the image cache)")
        all_targets = cached.catalog.targets if targets is None else np.asarray(targets, dtype=np.float32)
        if len(all_targets) != n:
            raise ValueError(f"targets have {len(all_targets)} rows; the cache has {n}")
        self.targets = torch.from_numpy(np.ascontiguousarray(all_targets[self.indices], dtype=np.float32))
        self.image_size = cached.image_size
        self._path: Path = cached.path
        self._images: np.ndarray | None = cached.images
        self.augment = augment
        self.seed = seed
        self.config = config or AugmentConfig()
        self.equalize = equalize
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    # The memmap is reopened in each worker process instead of being pickled (which would copy
    # the whole array under the spawn start method).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self._path, mmap_mode="r")
        return self._images

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A whole batch at once (DataLoader calls this): one memmap read, one grid_sample.

        DP-SGD's Poisson sampling can draw an empty batch: that is an empty list, which Opacus'
        collate turns into an empty batch of the right shape, so the noisy step still happens.
        """
        if len(items) == 0:
            return []
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        pixels = np.array(self.images[rows])
        if self.equalize:
            pixels = equalize_images(pixels)
        images = torch.from_numpy(pixels.astype(np.float32)).div_(255.0)
        if self.augment:
            rngs = [np.random.default_rng((self.seed, self.epoch, int(row))) for row in rows]
            images = augment_batch(images, rngs, self.config)
        images = (images - NORMALISATION["mean"]) / NORMALISATION["std"]
        return [(images[k].unsqueeze(0), self.targets[item]) for k, item in enumerate(items)]


def augment_batch(
    images: torch.Tensor, rngs: Sequence[np.random.Generator], config: AugmentConfig
) -> torch.Tensor:
    """Augment [B, S, S] float images in [0, 1], sample k drawing its parameters from ``rngs[k]``."""
    c = config
    params = np.array(
        [
            [
                math.radians(rng.uniform(-c.max_rotation, c.max_rotation)),
                1.0 + rng.uniform(-c.max_scale, c.max_scale),
                rng.uniform(-c.max_shift, c.max_shift) * 2.0,  # grid coordinates span [-1, 1]
                rng.uniform(-c.max_shift, c.max_shift) * 2.0,
                -1.0 if rng.random() < c.hflip_probability else 1.0,
                1.0 + rng.uniform(-c.intensity, c.intensity),  # contrast
                rng.uniform(-c.intensity, c.intensity) * 0.5,  # brightness
                1.0 + rng.uniform(-c.intensity, c.intensity),  # gamma
            ]
            for rng in rngs
        ],
        dtype=np.float64,
    )
    p = torch.from_numpy(params).float()
    angle, scale, tx, ty, flip = p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([flip * cos, -sin, tx], 1), torch.stack([flip * sin, cos, ty], 1)], 1)
    batch = images.unsqueeze(1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    contrast, brightness, gamma = (p[:, k].view(-1, 1, 1) for k in (5, 6, 7))
    mean = out.mean(dim=(1, 2), keepdim=True)
    out = ((out - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)
    return out.pow_(gamma)


def augment_image(image: torch.Tensor, rng: np.random.Generator, config: AugmentConfig) -> torch.Tensor:
    """Augment one [S, S] float image in [0, 1] (the batch path with a batch of one)."""
    return augment_batch(image.unsqueeze(0), [rng], config)[0]
