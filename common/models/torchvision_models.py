"""torchvision architectures (ResNet18, DenseNet121, MobileNetV2) adapted for cxr-fl.

Adaptations, all made at construction time:
- the chosen norm (``norm_layer`` where the constructor takes one; DenseNet's BatchNorms are
  replaced after construction);
- a first convolution taking ``in_channels`` (1 for greyscale CXR, or 3);
- no in-place activations, and an out-of-place residual add in ResNet's BasicBlock, so Opacus'
  per-sample-gradient hooks work (see DESIGN.md, "Other dependency facts");
- dropout before the classifier, applied in ``forward`` so that parameter names stay those of
  torchvision (a local torchvision checkpoint then loads by name, see ``common.models.weights``);
- MobileNetV2: the last norm layer of every residual block starts with zero scale ("zero-gamma",
  Goyal et al. 2017), so each block starts as the identity. From scratch on the demo's images
  (626 training images at 64 px, Adam 0.002, batch 32, no KD) its test macro-AUROC passed 0.95
  after 3 epochs instead of 5 and 0.99 after 4 instead of 8 (issue 25): a site's few hundred
  images give only a few hundred optimiser steps.

No pretrained weights are downloaded; torchvision's ``weights=`` arguments are never used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.densenet import DenseNet
from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2
from torchvision.models.resnet import BasicBlock, ResNet

from common.models.norms import disable_inplace, norm_factory, replace_batchnorm


class OutOfPlaceBasicBlock(BasicBlock):
    """torchvision's BasicBlock with ``out = out + identity`` instead of ``out += identity``."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CxrResNet(ResNet):
    """torchvision ResNet with dropout before ``fc`` (module names unchanged)."""

    def __init__(self, *args: object, dropout: float = 0.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.head_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.head_dropout(x))


class CxrDenseNet(DenseNet):
    """torchvision DenseNet with an out-of-place final ReLU and dropout before ``classifier``."""

    def __init__(self, *args: object, dropout: float = 0.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.head_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(self.head_dropout(out))


def _first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A fresh copy of ``conv`` reading ``in_channels`` channels."""
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )


def build_resnet18(num_outputs: int, norm: str, in_channels: int, dropout: float) -> nn.Module:
    model = CxrResNet(
        OutOfPlaceBasicBlock,
        [2, 2, 2, 2],
        num_classes=num_outputs,
        norm_layer=norm_factory(norm),
        dropout=dropout,
    )
    model.conv1 = _first_conv(model.conv1, in_channels)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return disable_inplace(model)


def build_densenet121(num_outputs: int, norm: str, in_channels: int, dropout: float) -> nn.Module:
    model = CxrDenseNet(
        growth_rate=32,
        block_config=(6, 12, 24, 16),
        num_init_features=64,
        num_classes=num_outputs,
        dropout=dropout,
    )
    model.features.conv0 = _first_conv(model.features.conv0, in_channels)
    nn.init.kaiming_normal_(model.features.conv0.weight)
    replace_batchnorm(model, norm)
    return disable_inplace(model)


def build_mobilenetv2(
    num_outputs: int, norm: str, in_channels: int, width_mult: float, dropout: float
) -> nn.Module:
    model = MobileNetV2(
        num_classes=num_outputs, width_mult=width_mult, norm_layer=norm_factory(norm), dropout=dropout
    )
    first = model.features[0][0]
    model.features[0][0] = _first_conv(first, in_channels)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    for block in model.modules():
        if isinstance(block, InvertedResidual) and block.use_res_connect:
            nn.init.zeros_(block.conv[-1].weight)  # zero-gamma: the block starts as the identity
    return disable_inplace(model)
