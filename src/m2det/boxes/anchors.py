"""SSD prior boxes as M2Det lays them out: 6 per location, scales largest first, row-major.

For the official sizes (320, 512, 704, 800) the result equals the released code's prior boxes in
count, order and value (float32, bit for bit); any other input size or scale layout works too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from m2det.config import AnchorConfig
from m2det.errors import ConfigError


class AnchorGenerator:
    """Center-size anchors `(cx, cy, w, h)` normalised to the input side, clipped to [0, 1].

    Per location: the min size, sqrt(min * max), then for each aspect ratio r the pair
    (w, h) = (s*sqrt(r), s/sqrt(r)) and its transpose. Sizes are `size_pattern` times the input
    side, rounded to 2 decimals like the official `get_scales`.
    """

    def __init__(self, config: AnchorConfig, native_size: int):
        self.config = config
        self.native_size = int(native_size)
        self._cache: dict[tuple[int, tuple[int, ...], bool], Tensor] = {}

    def __call__(self, image_size: int, feature_sizes: Sequence[int]) -> Tensor:
        """Anchors for a square input of `image_size` whose pyramid has `feature_sizes`.

        The configured `steps` hold for one input size only (`native_size`, the model's own); at
        any other size each step is derived from its feature map, so centres stay on the cells.
        """
        use_steps = self.config.steps is not None and int(image_size) == self.native_size
        key = (int(image_size), tuple(int(f) for f in feature_sizes), use_steps)
        if key not in self._cache:
            self._cache[key] = self._generate(*key)
        return self._cache[key]

    def _generate(self, image_size: int, feature_sizes: tuple[int, ...], use_steps: bool) -> Tensor:
        cfg = self.config
        if len(feature_sizes) != len(cfg.size_pattern) - 1:
            raise ValueError(
                f"{len(feature_sizes)} feature maps but anchors.size_pattern describes {len(cfg.size_pattern) - 1}"
            )
        sizes = [round(p * image_size, 2) for p in cfg.size_pattern]
        per_scale = []
        for k, f in enumerate(feature_sizes):
            step = cfg.steps[k] if use_steps and cfg.steps is not None else image_size / f
            f_k = image_size / step
            idx = torch.arange(f, dtype=torch.float64)
            cy, cx = torch.meshgrid((idx + 0.5) / f_k, (idx + 0.5) / f_k, indexing="ij")
            s_k = sizes[k] / image_size
            shapes = [(s_k, s_k), (math.sqrt(s_k * (sizes[k + 1] / image_size)),) * 2]
            for ratio in cfg.aspect_ratios:
                shapes += [
                    (s_k * math.sqrt(ratio), s_k / math.sqrt(ratio)),
                    (s_k / math.sqrt(ratio), s_k * math.sqrt(ratio)),
                ]
            wh = torch.tensor(shapes, dtype=torch.float64)  # [a, 2]
            centers = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(shapes), 2)
            per_scale.append(torch.cat([centers, wh.expand_as(centers)], dim=-1).reshape(-1, 4))
        anchors = torch.cat(per_scale).float()
        if cfg.clip:
            anchors.clamp_(min=0.0, max=1.0)
        return anchors


def num_anchors(feature_sizes: Sequence[int], per_location: int) -> int:
    return sum(f * f for f in feature_sizes) * per_location


def check_feature_sizes(feature_sizes: Sequence[int], input_size: int, name: Optional[str] = None) -> None:
    if min(feature_sizes) < 1:
        raise ConfigError(
            f"input size {input_size} is too small for {name or 'this model'}: "
            f"the pyramid would be {list(feature_sizes)} (every scale needs at least 1x1)"
        )
