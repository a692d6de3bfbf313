"""`DetectionPipeline`: images in, detections out, around any runtime of the network.

Preprocessing (resize, normalise), anchors, decoding and (soft-)NMS are the same whatever runs
the network (`m2det.inference.Network`: eager PyTorch, the fast path, ONNX Runtime FP32 or INT8),
and the post-processing settings are the pipeline's own, given when it is built.

Multi-scale and flip testing (the paper's multi-scale inference; the released code never had it):
every pass is decoded into the original image's pixels with the anchors of its own input size, so
passes at different sizes and mirrored passes meet in one coordinate frame before suppression.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from m2det.boxes.coder import BoxCoder
from m2det.boxes.postprocess import Candidates, PostProcessor, PostprocessSettings
from m2det.errors import M2DetError
from m2det.inference.network import Network
from m2det.models.m2det import config_anchors, pyramid_sizes
from m2det.models.transform import normalize, pixel_means_tensor, resize_and_normalize


def mirror_boxes(boxes: Tensor, widths: Tensor) -> Tensor:
    """xyxy boxes of a horizontally flipped image -> the same boxes in the unflipped image."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([widths - x2, y1, widths - x1, y2], dim=-1)


class DetectionPipeline:
    """A `Network` with its pre- and post-processing: CHW RGB images (uint8, or float in [0, 1])
    -> one dict per image with `boxes` (xyxy, original pixels), `scores`, `labels` (and
    `label_names` with `label_names=True`).

    Args:
        network: what computes `(loc, logits)` from the normalised batch.
        settings: post-processing, "paper", "official" or a `PostprocessSettings`.
        sizes: input sizes to run at (several: multi-scale testing); None: the network's own.
        flip: also run on the mirrored images; all passes are merged before NMS.
    """

    def __init__(
        self,
        network: Network,
        settings: Union[str, PostprocessSettings] = "paper",
        *,
        sizes: Optional[Sequence[int]] = None,
        flip: bool = False,
        label_names: bool = True,
    ):
        self.network = network
        config = network.config
        self.postprocessor = PostProcessor(
            BoxCoder(config.anchors.variances),
            settings,
            categories=config.categories if label_names else None,
        )
        self.sizes = [int(s) for s in sizes] if sizes else [int(network.input_size)]
        for size in self.sizes:
            self.check_size(size)
        self.flip = bool(flip)
        self._pixel_means = pixel_means_tensor(config.pixel_means)
        self._anchors: dict[int, Tensor] = {}

    @property
    def settings(self) -> PostprocessSettings:
        return self.postprocessor.settings

    def check_size(self, size: int) -> None:
        """Raise a clear error for an input size the network cannot take."""
        fixed = self.network.fixed_input_size
        if fixed is not None and int(size) != fixed:
            raise M2DetError(
                f"the network was exported for input size {fixed}, cannot run at {size} "
                "(export again with --size for another input size)"
            )
        pyramid_sizes(self.network.config, int(size))

    def preprocess(
        self, images: Sequence[Tensor], size: Optional[int] = None
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """The network's input batch (on its device) at `size` (see `check_size`), and each image's (H, W)."""
        size = int(size or self.sizes[0])
        batch, image_sizes = resize_and_normalize(images, size, self._means())
        return batch.to(self.network.dtype), image_sizes

    def _means(self) -> Tensor:
        """The pixel means on the network's device (it may have moved since the pipeline was built)."""
        if self._pixel_means.device != self.network.device:
            self._pixel_means = self._pixel_means.to(self.network.device)
        return self._pixel_means

    def anchors(self, size: int) -> Tensor:
        """Anchors `[A, 4]` (cx, cy, w, h; normalised) for the input size `size`, computed once."""
        if size not in self._anchors:
            self._anchors[size] = config_anchors(self.network.config, size)
        return self._anchors[size]

    def candidates(self, images: Sequence[Tensor]) -> Candidates:
        """Score-filtered boxes of every (size, flip) pass over `images`, merged."""
        parts = []
        for size in self.sizes:
            batch, image_sizes = self.preprocess(images, size)
            parts += self._passes(batch, image_sizes, size)
        return Candidates.cat(parts)

    def _passes(self, batch: Tensor, image_sizes: list[tuple[int, int]], size: int) -> list[Candidates]:
        """The candidates of the network's input `batch` at `size`, and of its mirror with `flip`."""
        anchors = self.anchors(size)
        parts = []
        for mirrored in (False, True) if self.flip else (False,):
            loc, logits = self.network.forward_raw(batch.flip(-1) if mirrored else batch)
            post = self.postprocessor
            found = post.candidates(*post.decode(loc, logits, anchors, image_sizes))
            if mirrored:
                widths = found.boxes.new_tensor([w for _, w in image_sizes]).index_select(
                    0, found.image_index
                )
                found.boxes = mirror_boxes(found.boxes, widths)
            parts.append(found)
        return parts

    @torch.inference_mode()
    def detect_resized(self, batch: Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[dict]:
        """Detections for images already resized (`m2det.models.transform.resize_unit`, e.g. in a
        DataLoader worker): `batch` [N, 3, S, S] float RGB in [0, 1] at the one size S of `sizes`,
        `image_sizes` the (H, W) of the originals, whose pixels the boxes are in. The same numbers
        as calling the pipeline on the originals where the resize runs on the same device."""
        if len(self.sizes) != 1:
            raise ValueError(f"detect_resized runs at one input size, the pipeline has {self.sizes}")
        size = self.sizes[0]
        if tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(
                f"detect_resized: expected a batch [N, 3, {size}, {size}], got {tuple(batch.shape)}"
            )
        network_input = normalize(batch.to(self.network.device), self._means()).to(self.network.dtype)
        sizes = [(int(h), int(w)) for h, w in image_sizes]
        return self.postprocessor.suppress(
            Candidates.cat(self._passes(network_input, sizes, size)), len(sizes)
        )

    @torch.inference_mode()
    def __call__(self, images: Sequence[Tensor]) -> list[dict]:
        """Detections for `images` from all passes, suppressed together (one dict per image)."""
        return self.postprocessor.suppress(self.candidates(images), len(images))
