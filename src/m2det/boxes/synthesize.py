"""A realistic post-processing load: predictions synthesised as a trained detector's look.

Post-processing time depends on how many (anchor, class) scores pass the threshold and on how the
boxes cluster, so timing it on a random network's output says little; `m2det bench` uses this.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from m2det.boxes.coder import BoxCoder
from m2det.errors import M2DetError

BACKGROUND_LOGIT = 0.0
SUPPRESSED_LOGIT = -12.0  # a foreground logit whose probability stays far below any threshold


def synthesize_predictions(
    anchors: Tensor,
    num_classes: int,
    num_above: int,
    score_threshold: float,
    box_coder: BoxCoder,
    anchors_per_object: int = 25,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """`(loc [1, A, 4], logits [1, A, C])` in which exactly `num_above` (anchor, class) pairs score
    above `score_threshold`, as a trained detector's output looks: the anchors that overlap a few
    random objects most each predict that object's box (jittered) and class; every other score is
    far below the threshold."""
    num_anchors = anchors.shape[0]
    if not 0 <= num_above <= num_anchors:
        raise M2DetError(
            f"boxes above the threshold must be in [0, {num_anchors}] (the anchors), got {num_above}"
        )
    g = torch.Generator().manual_seed(seed)
    num_objects = max(1, math.ceil(num_above / anchors_per_object))
    centres = 0.1 + 0.8 * torch.rand(num_objects, 2, generator=g)
    sides = 0.05 + 0.35 * torch.rand(num_objects, 2, generator=g)
    objects = torch.cat([centres - sides / 2, centres + sides / 2], dim=1).clamp(0, 1)
    labels = torch.randint(1, num_classes, (num_objects,), generator=g)
    best_iou, best_object = box_iou(objects, box_convert(anchors, "cxcywh", "xyxy")).max(dim=0)
    chosen = best_iou.topk(num_above).indices
    owner = best_object[chosen]

    logits = torch.full((num_anchors, num_classes), SUPPRESSED_LOGIT)
    logits[:, 0] = BACKGROUND_LOGIT
    # a probability p for the owner's class, with background at 0 and the rest suppressed, needs
    # the logit log(p * rest / (1 - p)), rest = the other classes' exp-sum
    p = score_threshold + 0.01 + (0.95 - score_threshold - 0.01) * torch.rand(num_above, generator=g)
    rest = math.exp(BACKGROUND_LOGIT) + (num_classes - 2) * math.exp(SUPPRESSED_LOGIT)
    logits[chosen, labels[owner]] = torch.log(p * rest / (1 - p))

    loc = torch.zeros(num_anchors, 4)
    jitter = 0.02 * torch.randn(num_above, 4, generator=g)
    targets = (objects[owner] + jitter).clamp(0, 1)
    targets = torch.cat([targets[:, :2], torch.maximum(targets[:, 2:], targets[:, :2] + 0.01)], dim=1)
    loc[chosen] = box_coder.encode(targets, anchors[chosen])
    found = int((logits.softmax(-1)[:, 1:] > score_threshold).sum())
    if found != num_above:
        raise RuntimeError(f"synthesised {found} scores above the threshold instead of {num_above}")
    return loc[None], logits[None]
