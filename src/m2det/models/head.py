"""SSD-style prediction heads: one 3x3 conv for box offsets and one for class logits per scale."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor, nn


def _flatten_nhwc(x: Tensor, per_anchor: int) -> Tensor:
    """[N, A*K, H, W] -> [N, H*W*A, K]: locations row-major, anchors innermost (the official order)."""
    n = x.shape[0]
    return x.permute(0, 2, 3, 1).reshape(n, -1, per_anchor)


class M2DetHead(nn.Module):
    """Per-scale loc/conf 3x3 convs over the pyramid; outputs concatenated over scales, largest first.

    `in_channels` is one count for every scale (the MLFPN) or one per scale (SSD's own pyramid).
    """

    def __init__(
        self, in_channels: Union[int, Sequence[int]], num_anchors: int, num_classes: int, num_scales: int
    ):
        super().__init__()
        channels = [in_channels] * num_scales if isinstance(in_channels, int) else list(in_channels)
        if len(channels) != num_scales:
            raise ValueError(f"in_channels has {len(channels)} entries for {num_scales} scales")
        self.num_classes = num_classes
        self.loc = nn.ModuleList(nn.Conv2d(c, num_anchors * 4, 3, padding=1) for c in channels)
        self.conf = nn.ModuleList(nn.Conv2d(c, num_anchors * num_classes, 3, padding=1) for c in channels)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        loc = torch.cat([_flatten_nhwc(head(x), 4) for head, x in zip(self.loc, features)], dim=1)
        conf = torch.cat(
            [_flatten_nhwc(head(x), self.num_classes) for head, x in zip(self.conf, features)], dim=1
        )
        return loc, conf
