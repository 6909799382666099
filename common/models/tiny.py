"""``tiny-cnn``: three conv blocks and a linear head, for tests and CI (fast at 32-64 px)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common.models.norms import make_norm

TINY_WIDTHS: tuple[int, int, int] = (8, 16, 32)


class TinyCnn(nn.Module):
    """conv3x3-norm-relu blocks of widths 8, 16, 32 (x width_mult), strides 1, 2, 2; pool; head."""

    def __init__(
        self, num_outputs: int, norm: str, in_channels: int = 1, width_mult: float = 1.0, dropout: float = 0.2
    ) -> None:
        super().__init__()
        widths = [max(8, round(w * width_mult / 8) * 8) for w in TINY_WIDTHS]
        blocks: list[nn.Module] = []
        channels = in_channels
        for width, stride in zip(widths, (1, 2, 2), strict=True):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, kernel_size=3, stride=stride, padding=1, bias=False),
                    make_norm(norm, width),
                    nn.ReLU(),
                )
            )
            channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(channels, num_outputs))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))
