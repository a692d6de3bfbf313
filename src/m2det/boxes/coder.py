"""SSD box coding with variances: offsets of ground truth relative to center-size anchors."""

from __future__ import annotations

import torch
from torch import Tensor


class BoxCoder:
    """Encode xyxy boxes against (cx, cy, w, h) anchors and decode back, SSD style.

    Works on any leading batch dimensions as long as the last is 4 and shapes broadcast.
    """

    def __init__(self, variances: tuple[float, float] = (0.1, 0.2)):
        self.variances = (float(variances[0]), float(variances[1]))

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        v0, v1 = self.variances
        centers = (boxes[..., :2] + boxes[..., 2:]) / 2
        sizes = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-12)
        offsets = (centers - anchors[..., :2]) / (v0 * anchors[..., 2:])
        scales = torch.log(sizes / anchors[..., 2:]) / v1
        return torch.cat([offsets, scales], dim=-1)

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Offsets -> xyxy boxes in the anchors' (normalised) units."""
        v0, v1 = self.variances
        centers = anchors[..., :2] + deltas[..., :2] * v0 * anchors[..., 2:]
        sizes = anchors[..., 2:] * torch.exp(deltas[..., 2:] * v1)
        top_left = centers - sizes / 2
        # x2 = x1 + w (not cx + w/2): the official rounding, so decoded boxes match it bit for bit
        return torch.cat([top_left, top_left + sizes], dim=-1)
