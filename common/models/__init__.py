"""Model registry: teachers, students and a tiny test network, all built the same way.

``build_model(config, num_outputs)`` looks the name up in :data:`MODELS`, builds the network
with the normalisation chosen up front (``batch`` or ``group``; see ModelConfig), and loads an
optional local weights file. Every registered model avoids in-place operations on the outputs of
parameterised layers so that Opacus can compute per-sample gradients through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from common.registry import Registry

Role = Literal["teacher", "student", "test"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model.

    Attributes:
        builder: ``builder(num_outputs, norm, in_channels, width_mult, dropout) -> nn.Module``.
        role: "teacher", "student" or "test" (tiny networks for tests and CI).
        description: one line for ``--help`` and model cards.
        gradcam_layer: dotted name of the module whose activations Grad-CAM uses by default.
    """

    builder: Callable[..., nn.Module]
    role: Role
    description: str
    gradcam_layer: str


MODELS: Registry[ModelSpec] = Registry("model")
