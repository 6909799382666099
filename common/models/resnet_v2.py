"""Pre-activation ResNet50 V2 feature extractor (He et al., "Identity Mappings in Deep Residual
Networks", 2016), the ResNet branch of the dual-backbone teacher.

Each bottleneck block is norm -> relu -> conv three times, with the shortcut taken from the
input (or, when the shape changes, from a 1x1 projection of the pre-activated input); the
residual add is out of place (Opacus). A final norm -> relu follows the last stage, as in
Keras' ``ResNet50V2`` that the COVID-19 KD papers used.

Differences from Keras' ``ResNet50V2``, for the record: Keras puts each stage's stride on its
*last* block (stages 1-3), we put it on the *first* block of stages 2-4 as in the paper
(same output size and the same convolution shapes); the stem convolution has no bias.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import conv1x1, conv3x3

from common.models.norms import make_norm

RESNET50_LAYERS: tuple[int, int, int, int] = (3, 4, 6, 3)
BOTTLENECK_EXPANSION = 4


class PreActBottleneck(nn.Module):
    """norm-relu-conv1x1, norm-relu-conv3x3 (stride), norm-relu-conv1x1(x4), plus shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        out_planes = planes * BOTTLENECK_EXPANSION
        self.norm1 = make_norm(norm, in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = conv1x1(in_planes, planes)
        self.norm2 = make_norm(norm, planes)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes, stride)
        self.norm3 = make_norm(norm, planes)
        self.relu3 = nn.ReLU()
        self.conv3 = conv1x1(planes, out_planes)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = conv1x1(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        preact = self.relu1(self.norm1(x))
        identity = x if self.shortcut is None else self.shortcut(preact)
        out = self.conv1(preact)
        out = self.conv2(self.relu2(self.norm2(out)))
        out = self.conv3(self.relu3(self.norm3(out)))
        return out + identity


class PreActResNetFeatures(nn.Module):
    """Stem, four stages of pre-activation bottlenecks, final norm and relu.

    Output: ``[B, 2048, H/32, W/32]`` feature maps (not pooled).
    """

    out_channels = 512 * BOTTLENECK_EXPANSION

    def __init__(
        self, norm: str, in_channels: int = 1, layers: tuple[int, int, int, int] = RESNET50_LAYERS
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        stages: list[nn.Sequential] = []
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stage.append(PreActBottleneck(in_planes, planes, stride if block == 0 else 1, norm))
                in_planes = planes * BOTTLENECK_EXPANSION
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.post_norm = make_norm(norm, in_planes)
        self.post_relu = nn.ReLU()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.post_relu(self.post_norm(x))
