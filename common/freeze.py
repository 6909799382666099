"""Freezing the first blocks of a teacher's backbone (run setting ``freeze-blocks``).

Under DP-SGD the noise added at each step grows with the number of trained parameters, so
training fewer of them (the later blocks and the head of a pretrained teacher) loses less signal.
A frozen parameter has ``requires_grad = False``: the optimiser never sees it
(:func:`common.training.make_optimizer` takes trainable parameters only) and Opacus computes no
per-sample gradient for it, clips nothing of it and adds no noise to it. Frozen parameters keep
the global teacher's values, so every site sends them back unchanged and FedAvg keeps them.
(Normalisation buffers of frozen blocks, BatchNorm's running statistics, still follow the
site's data in training mode; DP runs use GroupNorm, which has none.)

**Blocks** are found the same way for every registered model: the model's top-level children
that hold parameters, without the classifier head's; while there are fewer than three, each
container is replaced by its own parameterised children. ResNet18: conv1, bn1, layer1..layer4;
DenseNet121: features.conv0 .. features.norm5; MobileNetV2: features.0 .. features.18; the dual
teacher: resnet.stem, resnet.layer1..4, resnet.post_norm, vgg.features; tiny-cnn:
features.0..2. ``freeze-blocks = N`` freezes the first N; ``-1`` every block (only the head trains).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from torch import nn

from common.config import ModelConfig
from common.errors import ConfigError
from common.models import build_model
from common.models.weights import head_name

logger = logging.getLogger(__name__)

MIN_BLOCKS = 3
HEAD_ONLY = -1


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def backbone_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's blocks in forward order (see the module docstring), head excluded."""
    head_top = head_name(model).split(".")[0]
    blocks = [(n, m) for n, m in model.named_children() if n != head_top and _has_params(m)]
    while 0 < len(blocks) < MIN_BLOCKS:
        expanded = []
        for name, module in blocks:
            children = [(f"{name}.{n}", m) for n, m in module.named_children() if _has_params(m)]
            expanded.extend(children or [(name, module)])
        if len(expanded) == len(blocks):
            break
        blocks = expanded
    return blocks


def freeze_blocks(model: nn.Module, count: int, name: str | None = None) -> list[str]:
    """Freeze the first ``count`` backbone blocks (-1: all of them); return their names.

    Raises:
        ConfigError: ``count`` is larger than the number of blocks (the message lists them).
    """
    if count == 0:
        return []
    blocks = backbone_blocks(model)
    if count == HEAD_ONLY:
        count = len(blocks)
    if count < 0 or count > len(blocks):
        raise ConfigError(
            "freeze-blocks",
            count,
            f"an integer from 0 to {len(blocks)} for {name or type(model).__name__}, whose blocks are "
            f"{', '.join(n for n, _ in blocks)} (or -1 to train only the head)",
        )
    frozen = [name for name, _ in blocks[:count]]
    for _, module in blocks[:count]:
        for param in module.parameters():
            param.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "froze %d block(s) (%s): %d of %d parameters train", count, ", ".join(frozen), trainable, total
    )
    return frozen


def check_freeze_blocks(teacher: ModelConfig, num_outputs: int, count: int) -> None:
    """ConfigError (listing the blocks) when ``teacher`` has fewer than ``count`` blocks to freeze."""
    freeze_blocks(build_model(replace(teacher, weights=None), num_outputs), count, teacher.name)
