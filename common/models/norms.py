"""Normalisation and activation choices shared by every registered model.

A model's normalisation is fixed when it is built: ``batch`` (BatchNorm2d) or ``group``
(GroupNorm). DP-SGD needs ``group``: Opacus computes one gradient per image, and BatchNorm mixes
the images of a batch, so its per-image gradients do not exist. This module also turns off
``inplace`` on activations, because Opacus' backward hooks fail on in-place changes to the
output of a parameterised layer ("Output 0 of BackwardHookFunction is a view and is being
modified inplace").
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from common.errors import ConfigError

NORMS: tuple[str, ...] = ("batch", "group")
"""The normalisations a model can be built with (``common.config.Norm`` spells the same names)."""

MAX_GROUPS = 32
"""Upper bound on GroupNorm groups (Wu & He's default); the actual count divides the channels."""

NormFactory = Callable[[int], nn.Module]


def group_count(channels: int) -> int:
    """Number of GroupNorm groups for ``channels``: ``gcd(channels, 32)``, so it always divides."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return math.gcd(channels, MAX_GROUPS)


def make_norm(norm: str, channels: int) -> nn.Module:
    """A 2-d normalisation layer over ``channels`` feature maps: BatchNorm2d or GroupNorm."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    raise ConfigError("norm", norm, "one of " + ", ".join(NORMS))


def norm_factory(norm: str) -> NormFactory:
    """``norm_layer`` argument for torchvision constructors: ``channels -> nn.Module``."""
    make_norm(norm, 1)  # validate the name once, up front

    def factory(channels: int) -> nn.Module:
        return make_norm(norm, channels)

    return factory


def replace_batchnorm(module: nn.Module, norm: str) -> nn.Module:
    """Swap every BatchNorm2d in ``module`` (recursively, in place) for ``make_norm(norm, C)``.

    For constructors without a ``norm_layer`` argument (torchvision's DenseNet). Fresh layers
    start at weight 1, bias 0, as the replaced ones did.
    """
    if norm == "batch":
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, make_norm(norm, child.num_features))
        else:
            replace_batchnorm(child, norm)
    return module


def disable_inplace(module: nn.Module) -> nn.Module:
    """Set ``inplace=False`` on every activation or dropout module that has the flag."""
    for child in module.modules():
        if hasattr(child, "inplace") and isinstance(child.inplace, bool):
            child.inplace = False
    return module
