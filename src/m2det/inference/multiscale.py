"""Multi-scale and flip testing: predictions at several input sizes, and of the mirrored image,
merged before the final NMS (the paper's multi-scale inference; the released code never had it).

Every pass is decoded into the original image's pixels with the anchors of its own input size, so
passes at different sizes and mirrored passes meet in one coordinate frame before suppression.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from m2det.boxes.postprocess import Candidates, PostProcessor
from m2det.models.m2det import M2Det


def mirror_boxes(boxes: Tensor, widths: Tensor) -> Tensor:
    """xyxy boxes of a horizontally flipped image -> the same boxes in the unflipped image."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([widths - x2, y1, widths - x1, y2], dim=-1)


def gather_candidates(
    model: M2Det,
    postprocessor: PostProcessor,
    images: Sequence[Tensor],
    sizes: Sequence[int],
    flip: bool = False,
) -> Candidates:
    """Score-filtered boxes of every (size, flip) pass over `images` (CHW RGB tensors), merged.

    The network is `model.forward_raw`, which another runtime overrides (ONNX Runtime, the fast
    inference path) while decoding, merging and NMS stay the same.
    """
    parts = []
    for size in sizes:
        batch, image_sizes = model.preprocess(images, size)
        anchors = model.anchors(size)
        for mirrored in (False, True) if flip else (False,):
            loc, logits = model.forward_raw(batch.flip(-1) if mirrored else batch)
            found = postprocessor.candidates(*postprocessor.decode(loc, logits, anchors, image_sizes))
            if mirrored:
                widths = found.boxes.new_tensor([w for _, w in image_sizes]).index_select(
                    0, found.image_index
                )
                found.boxes = mirror_boxes(found.boxes, widths)
            parts.append(found)
    return Candidates.cat(parts)


def detect_multiscale(
    model: M2Det,
    postprocessor: PostProcessor,
    images: Sequence[Tensor],
    sizes: Sequence[int],
    flip: bool = False,
) -> list[dict]:
    """Detections for `images` from all passes, suppressed together (one dict per image)."""
    found = gather_candidates(model, postprocessor, images, sizes, flip)
    return postprocessor.suppress(found, len(images))
