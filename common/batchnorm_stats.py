"""Federated BatchNorm statistics: exact per-site moments, and their pooled combination.

FedAvg averages BatchNorm's running statistics like any weight, but they are buffers, not
weights: each site's are exponential moving averages of its last batches under its own drifted
weights, and their average matches neither the averaged weights nor any site's images. Under
label skew this shifts the global model's logits enough to collapse its argmax (its ranking
survives). Run setting ``bn-statistics = "federated"`` recomputes them for the aggregated
weights instead (server/batchnorm.py sends the model, client/app.py answers):

1. each site runs its un-augmented train split through the network in eval mode (no dropout),
   every BatchNorm layer normalising with its batch's own statistics (as torch's ``update_bn``:
   the statistics the model arrived with are not used), and accumulates the exact sums of each
   layer's input per channel, over every image and spatial position, in float64
   (:func:`site_moments`); it sends per layer the mean and the mean of squares (an
   ``ArrayRecord``) and its image count;
2. the server checks each reply (:func:`moments_problem`), weights the sites by their counts and
   combines the moments exactly (:func:`pooled_statistics`): mean = E[x], variance =
   (E[x^2] - E[x]^2) * N / (N - 1) over the union, unbiased as torch's ``running_var`` (N:
   values per channel, images times the layer's positions per image, :func:`positions_per_image`);
3. :func:`with_statistics` writes them into the model's ``running_mean``/``running_var``
   (``num_batches_tracked`` untouched).

Sums add up over batches and sites: the pooled statistics are exactly those of one pass over
the union of the sites' images in the same batches (a batch never mixes sites). Why batch
statistics inside the pass: a layer's input depends on how the layers before it normalise. With
the statistics the model arrived with (FedAvg's average, or the initial model's), the deeper
layers' statistics would describe activations that the pooled upstream statistics no longer
produce, and the errors compound (a ResNet18 in round 1 of the demo then scored a validation
loss of 3.7e5). Each batch's own statistics are close to the data's, as in ``update_bn``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

MEAN_SUFFIX = ".input_mean"
MEAN_SQ_SUFFIX = ".input_mean_sq"
"""Keys of a site's reply: ``<layer><suffix>``, one float array per BatchNorm layer and moment."""

VARIANCE_TOLERANCE = 1e-6
"""How far below 0 a site's E[x^2] - E[x]^2 may fall (float rounding), relative to E[x^2]."""


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers by module name (empty for a GroupNorm model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


@dataclass
class _Sums:
    values: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        dims = [0, *range(2, x.ndim)]  # every axis but the channels
        total, squares = x.sum(dim=dims), (x * x).sum(dim=dims)
        self.values += x.numel() // x.shape[1]
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares


@dataclass(frozen=True)
class SiteMoments:
    """One site's per-channel moments of every BatchNorm layer's input, and its image count."""

    images: int
    mean: dict[str, np.ndarray]
    mean_sq: dict[str, np.ndarray]

    def arrays(self) -> dict[str, np.ndarray]:
        """The moments as a reply's arrays (:data:`MEAN_SUFFIX`, :data:`MEAN_SQ_SUFFIX` keys)."""
        out = {f"{layer}{MEAN_SUFFIX}": values for layer, values in self.mean.items()}
        out.update({f"{layer}{MEAN_SQ_SUFFIX}": values for layer, values in self.mean_sq.items()})
        return out


def _batch_normalised(layer: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s output with the batch's own statistics (train-mode normalisation, done here
    so that no running buffer moves and a one-image batch stays defined)."""
    dims = [0, *range(2, x.ndim)]
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + layer.eps)
    if layer.affine:
        y = y * layer.weight.view(shape) + layer.bias.view(shape)
    return y


@torch.no_grad()
def site_moments(
    model: nn.Module, loader: Iterable[Any], *, device: str | torch.device = "cpu"
) -> SiteMoments:
    """Exact moments of every BatchNorm layer's input over ``loader``'s images (batches of
    ``(images, ...)``). The model runs in eval mode (no dropout), except that every BatchNorm
    layer normalises with its batch's statistics, as torch's ``update_bn`` does; no weight or
    buffer changes, and the model's train/eval mode is restored."""
    layers = batchnorm_layers(model)
    sums = {name: _Sums() for name in layers}
    hooks = []
    for name, layer in layers.items():
        hooks.append(layer.register_forward_pre_hook(lambda _m, args, name=name: sums[name].add(args[0])))
        hooks.append(layer.register_forward_hook(lambda m, args, _out: _batch_normalised(m, args[0])))
    was_training = model.training
    model.eval()
    images = 0
    try:
        for batch in loader:
            inputs = batch[0] if isinstance(batch, list | tuple) else batch
            model(inputs.to(device))
            images += int(inputs.shape[0])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    mean: dict[str, np.ndarray] = {}
    mean_sq: dict[str, np.ndarray] = {}
    for name, s in sums.items():
        if s.total is None or s.squares is None:
            raise ValueError(f"BatchNorm layer {name!r} saw no input: the loader gave no images")
        mean[name] = (s.total / s.values).cpu().numpy()
        mean_sq[name] = (s.squares / s.values).cpu().numpy()
    return SiteMoments(images, mean, mean_sq)


@torch.no_grad()
def positions_per_image(model: nn.Module, in_channels: int, image_size: int) -> dict[str, int]:
    """Values per channel that one image gives each BatchNorm layer (its input's spatial
    positions), from one forward pass of a blank image (the model's mode is restored)."""
    layers = batchnorm_layers(model)
    positions: dict[str, int] = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda _m, args, name=name: positions.__setitem__(name, args[0].numel() // args[0].shape[1])
        )
        for name, layer in layers.items()
    ]
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        model(torch.zeros(1, in_channels, image_size, image_size, device=parameter.device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return positions


def expected_channels(model: nn.Module) -> dict[str, int]:
    """Channels of every BatchNorm layer (the shape a site's moments must have)."""
    return {name: int(layer.num_features) for name, layer in batchnorm_layers(model).items()}


def moments_problem(arrays: Mapping[str, np.ndarray], channels: Mapping[str, int]) -> str | None:
    """Why a site's reply cannot be combined (None when it can): keys other than the model's
    layers, a shape other than (channels,), not floating point, not finite, a negative mean of
    squares or a variance below 0 (beyond :data:`VARIANCE_TOLERANCE`)."""
    expected = {f"{layer}{suffix}" for layer in channels for suffix in (MEAN_SUFFIX, MEAN_SQ_SUFFIX)}
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or extra:
        return (
            f"its statistics are not the model's BatchNorm layers (missing {missing[:3]}, extra {extra[:3]})"
        )
    for layer, size in channels.items():
        mean, mean_sq = arrays[f"{layer}{MEAN_SUFFIX}"], arrays[f"{layer}{MEAN_SQ_SUFFIX}"]
        for key, values in ((MEAN_SUFFIX, mean), (MEAN_SQ_SUFFIX, mean_sq)):
            if values.shape != (size,):
                return f"its {layer}{key} has shape {values.shape}, expected ({size},)"
            if values.dtype.kind != "f":
                return f"its {layer}{key} holds {values.dtype} values, not floating point"
            if not np.isfinite(values).all():
                return f"its {layer}{key} holds non-finite values"
        variance = mean_sq.astype(np.float64) - mean.astype(np.float64) ** 2
        if (mean_sq < 0).any() or (variance < -VARIANCE_TOLERANCE * np.maximum(1.0, mean_sq)).any():
            return f"its {layer} statistics give a negative variance"
    return None


def pooled_statistics(
    sites: Iterable[tuple[float, Mapping[str, np.ndarray]]], positions: Mapping[str, int]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer, the (mean, unbiased variance) of the union of the sites' images.

    ``sites``: (image count, checked moments as :meth:`SiteMoments.arrays` names them) per site;
    ``positions``: values per channel per image of every layer (:func:`positions_per_image`).
    """
    parts = [(float(weight), arrays) for weight, arrays in sites]
    total = sum(weight for weight, _ in parts)
    if not parts or total <= 0:
        raise ValueError("no site statistics to combine")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for layer, per_image in positions.items():
        mean = sum(w * a[f"{layer}{MEAN_SUFFIX}"].astype(np.float64) for w, a in parts) / total
        mean_sq = sum(w * a[f"{layer}{MEAN_SQ_SUFFIX}"].astype(np.float64) for w, a in parts) / total
        values = total * per_image
        correction = values / (values - 1) if values > 1 else 1.0
        variance: np.ndarray = np.maximum(mean_sq - mean**2, 0.0) * correction
        out[layer] = (np.asarray(mean, dtype=np.float64), variance)
    return out


def with_statistics(
    state: Mapping[str, torch.Tensor], statistics: Mapping[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, torch.Tensor]:
    """``state`` with every layer's ``running_mean``/``running_var`` replaced (same dtype);
    ``num_batches_tracked`` and everything else as they are."""
    out = dict(state)
    for layer, (mean, var) in statistics.items():
        for buffer, values in (("running_mean", mean), ("running_var", var)):
            key = f"{layer}.{buffer}"
            out[key] = torch.as_tensor(values, dtype=state[key].dtype).reshape(state[key].shape)
    return out
