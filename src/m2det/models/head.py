"""SSD-style prediction heads: one 3x3 conv for box offsets and one for class logits per scale."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _flatten_nhwc(x: Tensor, per_anchor: int) -> Tensor:
    """[N, A*K, H, W] -> [N, H*W*A, K]: locations row-major, anchors innermost (the official order)."""
    n = x.shape[0]
    return x.permute(0, 2, 3, 1).reshape(n, -1, per_anchor)


class M2DetHead(nn.Module):
    """Per-scale loc/conf 3x3 convs over the pyramid; outputs concatenated over scales, largest first."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_scales: int):
        super().__init__()
        self.num_classes = num_classes
        self.loc = nn.ModuleList(
            nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1) for _ in range(num_scales)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1) for _ in range(num_scales)
        )

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        loc = torch.cat([_flatten_nhwc(head(x), 4) for head, x in zip(self.loc, features)], dim=1)
        conf = torch.cat(
            [_flatten_nhwc(head(x), self.num_classes) for head, x in zip(self.conf, features)], dim=1
        )
        return loc, conf
