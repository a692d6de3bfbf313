"""The official input convention: RGB images -> the batch every M2Det network takes.

One definition, shared by `M2Det.preprocess`, the inference pipeline (any runtime) and INT8
calibration, so that every path feeds a network exactly the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize(images: Tensor, pixel_means: Tensor) -> Tensor:
    """RGB in [0, 1], [N, 3, H, W] -> the official convention (BGR, 0..255 minus the means)."""
    return images.flip(1) * 255.0 - pixel_means.to(images.dtype)


def pixel_means_tensor(means: Sequence[float], device: Union[torch.device, str] = "cpu") -> Tensor:
    """The per-channel means (BGR) of a config as the `[1, 3, 1, 1]` tensor `normalize` takes."""
    return torch.tensor(list(means), dtype=torch.float32, device=device).view(1, 3, 1, 1)


def resize_unit(image: Tensor, size: int, index: int = 0) -> Tensor:
    """One CHW RGB image (uint8, or float in [0, 1]) as float in [0, 1] at `size` x `size` (bilinear,
    not letterboxed), where it is. The first half of `resize_and_normalize`, for a caller that
    resizes elsewhere (a DataLoader worker) and normalises on the network's device."""
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"images[{index}]: expected a CHW tensor with 3 channels, got {shape}")
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if image.shape[1:] != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return image


def resize_and_normalize(
    images: Sequence[Tensor], size: int, pixel_means: Tensor
) -> tuple[Tensor, list[tuple[int, int]]]:
    """Resize each CHW RGB image (uint8, or float in [0, 1]) to `size` x `size` (bilinear, not
    letterboxed) and normalise, on `pixel_means`' device; also return the original (H, W) sizes."""
    batch = [resize_unit(image, size, i) for i, image in enumerate(images)]
    sizes = [(int(image.shape[1]), int(image.shape[2])) for image in images]
    return normalize(torch.stack(batch).to(pixel_means.device), pixel_means), sizes
