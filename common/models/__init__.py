"""Model registry: teachers, students and a tiny test network, all built the same way.

``build_model(config, num_outputs)`` looks the name up in :data:`MODELS`, builds the network with
the normalisation chosen up front (``batch`` or ``group``; see common.config.ModelConfig, which
checks a name against :data:`MODELS`), and loads an optional local weights file. Every registered
model avoids in-place operations on the outputs of parameterised layers so that Opacus can compute
per-sample gradients through it.

Registered models (names are config values):

============== ======= ==========================================================
name           role    architecture
============== ======= ==========================================================
resnet50v2-vgg19 teacher pre-activation ResNet50 V2 + VGG19 features, concatenated
densenet121    teacher torchvision DenseNet121
resnet18       teacher torchvision ResNet18
mobilenetv2    student torchvision MobileNetV2 (``width_mult``)
tiny-cnn       test    three conv blocks, for tests and CI (``width_mult``)
============== ======= ==========================================================

All take ``in_channels`` 1 (greyscale CXR) or 3 and return logits ``[B, num_outputs]``; the
smallest input is 32 px. Models without a width multiplier refuse ``width_mult != 1``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.errors import ModelError
from common.models.dual import ResNet50V2Vgg19
from common.models.norms import NORMS
from common.models.tiny import TinyCnn
from common.models.torchvision_models import build_densenet121, build_mobilenetv2, build_resnet18
from common.models.weights import head_shapes_differ, load_state, load_weights, read_state_dict
from common.registry import Registry

logger = logging.getLogger(__name__)


class ModelRecipe(Protocol):
    """What :func:`build_model` reads of a network to build (common.config.ModelConfig is one; the
    models never import the settings, which import them to check a name)."""

    @property
    def name(self) -> str: ...
    @property
    def norm(self) -> str: ...
    @property
    def weights(self) -> Path | None: ...
    @property
    def in_channels(self) -> int: ...
    @property
    def width_mult(self) -> float: ...
    @property
    def dropout(self) -> float: ...


Role = Literal["teacher", "student", "test"]
ROLES: tuple[str, ...] = ("teacher", "student", "test")


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


def _no_width(name: str, width_mult: float) -> None:
    if width_mult != 1.0:
        raise ModelError(
            f"model '{name}' has no width multiplier (got width-mult={width_mult}); leave width-mult at 1.0 "
            "or choose mobilenetv2 or tiny-cnn"
        )


def _build_dual(
    num_outputs: int, norm: str, in_channels: int, width_mult: float, dropout: float
) -> nn.Module:
    _no_width("resnet50v2-vgg19", width_mult)
    return ResNet50V2Vgg19(num_outputs, norm, in_channels, dropout)


def _build_densenet121(
    num_outputs: int, norm: str, in_channels: int, width_mult: float, dropout: float
) -> nn.Module:
    _no_width("densenet121", width_mult)
    return build_densenet121(num_outputs, norm, in_channels, dropout)


def _build_resnet18(
    num_outputs: int, norm: str, in_channels: int, width_mult: float, dropout: float
) -> nn.Module:
    _no_width("resnet18", width_mult)
    return build_resnet18(num_outputs, norm, in_channels, dropout)


def _build_tiny(
    num_outputs: int, norm: str, in_channels: int, width_mult: float, dropout: float
) -> nn.Module:
    return TinyCnn(num_outputs, norm, in_channels, width_mult, dropout)


MODELS.add(
    "resnet50v2-vgg19",
    ModelSpec(
        _build_dual,
        "teacher",
        "dual-backbone teacher: pre-activation ResNet50 V2 + VGG19 features, concatenated (43.5 M params)",
        "resnet.layer4",
    ),
)
MODELS.add(
    "densenet121",
    ModelSpec(
        _build_densenet121, "teacher", "DenseNet121 (torchvision architecture, 7.0 M params)", "features"
    ),
)
MODELS.add(
    "resnet18",
    ModelSpec(_build_resnet18, "teacher", "ResNet18 (torchvision architecture, 11.2 M params)", "layer4"),
)
MODELS.add(
    "mobilenetv2",
    ModelSpec(
        build_mobilenetv2,
        "student",
        "MobileNetV2 student (torchvision, width multiplier, 2.2 M params)",
        "features",
    ),
)
MODELS.add(
    "tiny-cnn",
    ModelSpec(_build_tiny, "test", "three conv blocks for tests and CI (fast at 32-64 px)", "features.2"),
)


def get_spec(name: str) -> ModelSpec:
    """The registered spec of ``name``; UnknownNameError (listing the valid names) otherwise."""
    return MODELS.get(name)


def list_models(role: str | None = None) -> list[str]:
    """Registered model names, sorted; only those of ``role`` ('teacher', 'student', 'test') if given."""
    if role is None:
        return MODELS.names()
    if role not in ROLES:
        raise ModelError(f"unknown model role '{role}'; choose one of {', '.join(ROLES)}")
    return [name for name in MODELS.names() if MODELS.get(name).role == role]


def build_model(config: ModelRecipe, num_outputs: int) -> nn.Module:
    """Build ``config.name`` with ``num_outputs`` logits, its norm and input channels fixed now.

    When ``config.weights`` is set the local file is loaded (see :mod:`common.models.weights`):
    every layer must fit, except that RGB input kernels are summed for a greyscale model and,
    if the file's classifier head has another shape (pretrained on other classes) while all
    else fits, the head is left randomly initialised and a WARNING says so. To refuse such a
    file instead, build without weights and call ``load_weights(model, path)`` (strict).

    Raises:
        UnknownNameError: the name is not registered (the message lists the valid ones).
        ModelError: bad ``num_outputs``, a width multiplier the model lacks, or a weights file
            that does not fit.
    """
    spec = MODELS.get(config.name)
    if num_outputs < 1:
        raise ModelError(f"num_outputs must be >= 1 for model '{config.name}', got {num_outputs}")
    model = spec.builder(
        num_outputs=num_outputs,
        norm=config.norm,
        in_channels=config.in_channels,
        width_mult=config.width_mult,
        dropout=config.dropout,
    )
    if config.weights is not None:
        state = read_state_dict(config.weights)
        skip_head = head_shapes_differ(model, state)
        if skip_head:
            logger.warning(
                "weights '%s' were trained for another number of outputs: keeping %s's classifier head "
                "randomly initialised (%d outputs) and loading the rest",
                config.weights,
                config.name,
                num_outputs,
            )
        load_state(model, state, source=str(config.weights), skip_head=skip_head)
        logger.info("model '%s': loaded local weights '%s'", config.name, config.weights)
    return model


def has_depthwise_convolutions(model: nn.Module) -> bool:
    """Whether any convolution is depthwise (one group per input channel, e.g. MobileNetV2)."""
    return any(
        isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels
        for layer in model.modules()
    )


def to_training_layout(model: nn.Module, device: torch.device | str) -> nn.Module:
    """The channels-last memory layout on the CPU for a network with depthwise convolutions, in
    place: oneDNN trains the demo's MobileNetV2 student (width 0.5, 64 px, 2 threads) 1.44x faster
    at batch 16 and 1.64x at batch 32 (benchmarks/student_layout.py); ResNet18 gains nothing, so
    other networks and devices are left as they are. The arithmetic is the same; the order of
    summation differs, so results differ in the last bits. Undo with :func:`to_standard_layout`
    before weights leave the training loop."""
    if torch.device(device).type == "cpu" and has_depthwise_convolutions(model):
        model.to(memory_format=torch.channels_last)
    return model


def to_standard_layout(model: nn.Module) -> nn.Module:
    """Contiguous (NCHW) parameters again, in place, as every saved or sent state dict has them."""
    return model.to(memory_format=torch.contiguous_format)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, image_size: int, in_channels: int = 1) -> int:
    """Forward FLOPs for one ``image_size`` x ``image_size`` image, eval mode.

    Convention (that of ``torch.utils.flop_counter.FlopCounterMode``): **2 FLOPs per
    multiply-add** of convolutions and matrix products (so MACs = FLOPs / 2); elementwise ops,
    norms, activations and pooling are not counted. The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, in_channels, image_size, image_size, device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


__all__ = [
    "MODELS",
    "NORMS",
    "ROLES",
    "ModelSpec",
    "Role",
    "build_model",
    "count_flops",
    "count_parameters",
    "get_spec",
    "list_models",
    "load_weights",
]
