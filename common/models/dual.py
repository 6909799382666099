"""The dual-backbone teacher of the COVID-19 knowledge-distillation literature.

A pre-activation ResNet50 V2 and a VGG19 feature extractor look at the same image side by side;
each one's feature maps are globally average-pooled, the two vectors are concatenated
(2048 + 512 = 2560 features) and a head (dropout -> linear) gives the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common.models.resnet_v2 import PreActResNetFeatures
from common.models.vgg import VggFeatures


class ResNet50V2Vgg19(nn.Module):
    """Dual-backbone teacher: ResNet50 V2 and VGG19 features, concatenated, dropout, linear.

    Size (measured with ``count_parameters`` / ``count_flops``, 1-channel input, 3 outputs):
    43,530,499 parameters with either norm (GroupNorm and BatchNorm both have two parameters
    per channel): ResNet branch 23,494,080, VGG branch 20,028,736, head 7,683. Forward cost at
    224 px, one image: 46.92 GFLOPs (ResNet branch 8.02, VGG branch 38.90), counted as 2 FLOPs
    per multiply-add of convolutions and the linear layer (norms, activations and pooling not
    counted). The smallest input is 32 px (both branches downsample by 32).

    Grad-CAM uses ``resnet.layer4``, the last stage of the ResNet branch.
    """

    def __init__(self, num_outputs: int, norm: str, in_channels: int = 1, dropout: float = 0.2) -> None:
        super().__init__()
        self.resnet = PreActResNetFeatures(norm, in_channels)
        self.vgg = VggFeatures(norm, in_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        features = PreActResNetFeatures.out_channels + VggFeatures.out_channels
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_outputs))

    def forward(self, x: Tensor) -> Tensor:
        resnet = torch.flatten(self.pool(self.resnet(x)), 1)
        vgg = torch.flatten(self.pool(self.vgg(x)), 1)
        return self.head(torch.cat([resnet, vgg], dim=1))
