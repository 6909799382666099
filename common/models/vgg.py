"""VGG19 convolutional feature extractor (configuration "E") with a chosen normalisation.

The VGG branch of the dual-backbone teacher: sixteen 3x3 convolutions, each followed by the
chosen norm and a ReLU (not in place), five 2x2 max-pools. Output: ``[B, 512, H/32, W/32]``.
Convolutions carry no bias because a norm follows each of them.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.vgg import cfgs

from common.models.norms import make_norm

VGG19_CFG: list[str | int] = list(cfgs["E"])


class VggFeatures(nn.Module):
    """``features``: the conv/norm/relu/max-pool stack of VGG (default cfg "E", VGG19)."""

    out_channels = 512

    def __init__(self, norm: str, in_channels: int = 1, cfg: list[str | int] | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG19_CFG if cfg is None else cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            width = int(item)
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                make_norm(norm, width),
                nn.ReLU(),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)
