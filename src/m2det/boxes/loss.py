"""The SSD multibox loss M2Det trains with: smooth-L1 on matched offsets, cross-entropy with hard negatives.

Options beside the paper's loss (all off by default): label smoothing of the cross-entropy, an
IoU-based box loss on the decoded boxes, and another matcher (e.g. `ATSSMatcher`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import (
    box_convert,
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
)

from m2det.boxes.coder import BoxCoder
from m2det.boxes.matcher import AnchorMatcher, Matcher

# Box losses on decoded xyxy boxes (torchvision's), beside the paper's smooth-L1 on encoded offsets.
IOU_LOSSES: dict[str, Callable[..., Tensor]] = {
    "giou": generalized_box_iou_loss,
    "diou": distance_box_iou_loss,
    "ciou": complete_box_iou_loss,
}
BOX_LOSSES = ("smooth_l1", *IOU_LOSSES)


class MultiBoxLoss:
    """SSD multibox loss, batched over images and anchors.

    Anchors are matched to ground truth by `AnchorMatcher` (IoU >= `iou_threshold`, plus each box's
    best anchor). `loss_box` is the smooth-L1 (beta 1) over positives of the SSD-encoded offsets;
    `loss_cls` is the cross-entropy over positives and, per image, the `neg_pos_ratio` x positives
    (at most A - 1) background anchors with the highest background loss. Both are sums divided by
    the number of positives in the batch (at least 1); under DDP, by the mean over processes, so
    training on several processes equals one process on the global batch.

    An image without boxes has no positives, so by default (`min_negatives=0`, the official
    behaviour) it mines no negatives and adds nothing to either loss. `min_negatives > 0` makes
    every image mine at least that many hard negatives, so empty images also teach background.

    Options (the defaults are the paper's): `label_smoothing` e mixes the one-hot target with the
    uniform distribution over the C classes, `(1 - e) * CE + e * mean_c(-log p_c)` as
    `F.cross_entropy(label_smoothing=e)`, for positives and mined negatives alike (the mining still
    ranks by the plain background loss); `box_loss` "giou" / "diou" / "ciou" replaces the smooth-L1
    by that IoU loss between the decoded prediction and the matched box; `box_loss_weight` scales
    the box loss;
    `matcher` replaces the 0.5-IoU `AnchorMatcher` (e.g. `ATSSMatcher`, which needs the anchors'
    pyramid levels: `level_sizes` in the call).
    """

    def __init__(
        self,
        box_coder: BoxCoder,
        iou_threshold: float = 0.5,
        neg_pos_ratio: float = 3,
        min_negatives: int = 0,
        *,
        label_smoothing: float = 0.0,
        box_loss: str = "smooth_l1",
        box_loss_weight: float = 1.0,
        matcher: Optional[Matcher] = None,
    ):
        if neg_pos_ratio < 0:
            raise ValueError(f"neg_pos_ratio must be >= 0, got {neg_pos_ratio}")
        if min_negatives < 0:
            raise ValueError(f"min_negatives must be >= 0, got {min_negatives}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        if not box_loss_weight > 0:
            raise ValueError(f"box_loss_weight must be > 0, got {box_loss_weight}")
        self.box_coder = box_coder
        self.matcher = matcher if matcher is not None else AnchorMatcher(iou_threshold)
        self.neg_pos_ratio = neg_pos_ratio
        self.min_negatives = int(min_negatives)
        self.label_smoothing = float(label_smoothing)
        self.box_loss = box_loss
        self.box_loss_weight = float(box_loss_weight)

    def __call__(
        self,
        loc: Tensor,
        logits: Tensor,
        anchors: Tensor,
        targets: list[dict[str, Tensor]],
        level_sizes: Optional[Sequence[int]] = None,
    ) -> dict[str, Tensor]:
        """Losses for predictions `loc [N, A, 4]`, `logits [N, A, C]` against `anchors [A, 4]`
        (cx, cy, w, h; normalised) and per-image targets `{boxes: [K, 4] normalised xyxy, labels: [K]}`;
        `level_sizes`: the anchors of each pyramid level, for a matcher that needs them.
        """
        boxes, labels = _unpack_targets(targets, loc, logits, anchors)
        matched_boxes, matched_labels = self.matcher(
            boxes, labels, box_convert(anchors, "cxcywh", "xyxy"), level_sizes
        )
        loc, logits = loc.float(), logits.float()  # under autocast the sums still run in float32

        positive = matched_labels > 0
        num_positive = positive.sum(dim=1)
        normalizer = global_mean(num_positive.sum().float()).clamp(min=1)
        loss_box = self.box_loss_sum(loc, anchors, matched_boxes, positive) / normalizer

        log_norm = torch.logsumexp(logits, dim=-1)
        cross_entropy = log_norm - logits.gather(-1, matched_labels[..., None]).squeeze(-1)
        if self.label_smoothing:
            uniform = log_norm - logits.mean(dim=-1)  # the cross-entropy against 1/C for every class
            cross_entropy = (1.0 - self.label_smoothing) * cross_entropy + self.label_smoothing * uniform
        negative = self.hard_negatives(log_norm - logits[..., 0], positive, num_positive)
        loss_cls = torch.where(positive | negative, cross_entropy, 0.0).sum() / normalizer
        return {"loss_box": loss_box, "loss_cls": loss_cls}

    def box_loss_sum(self, loc: Tensor, anchors: Tensor, matched_boxes: Tensor, positive: Tensor) -> Tensor:
        """The box loss summed over the positive anchors, times `box_loss_weight`."""
        if self.box_loss == "smooth_l1":
            loc_targets = self.box_coder.encode(matched_boxes, anchors)
            box_loss = F.smooth_l1_loss(loc, loc_targets, beta=1.0, reduction="none").sum(dim=-1)
            loss = torch.where(positive, box_loss, 0.0).sum()
        else:
            # only the positives: decoding a background anchor's free prediction may overflow, and a
            # NaN masked out by `where` still poisons the gradient
            predicted = self.box_coder.decode(loc[positive], anchors.expand_as(loc)[positive])
            loss = IOU_LOSSES[self.box_loss](predicted, matched_boxes[positive], reduction="sum")
        return self.box_loss_weight * loss  # x 1.0 (the paper's) is exact

    def hard_negatives(self, background_loss: Tensor, positive: Tensor, num_positive: Tensor) -> Tensor:
        """Mask `[N, A]` of the background anchors with the highest background loss, per image."""
        num_anchors = background_loss.shape[1]
        num_negative = torch.floor(num_positive * float(self.neg_pos_ratio)).long()
        num_negative = num_negative.clamp(min=self.min_negatives, max=num_anchors - 1)
        quota = int(num_negative.max()) if num_negative.numel() else 0
        # positives rank last (-inf), so any that fall inside the quota are positives anyway
        ranking = background_loss.detach().masked_fill(positive, float("-inf"))
        hardest = ranking.topk(quota, dim=1).indices  # much cheaper than a full sort for small quotas
        keep = torch.arange(quota, device=hardest.device)[None, :] < num_negative[:, None]
        return torch.zeros_like(positive).scatter_(1, hardest, keep) & ~positive


def global_mean(value: Tensor) -> Tensor:
    """The mean of `value` over the processes of an initialised process group (itself otherwise).

    Dividing each process's loss sum by the mean positive count makes the DDP-averaged gradient
    equal to the gradient of one process on the global batch, whatever each process's share.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def _unpack_targets(
    targets: list[dict[str, Tensor]], loc: Tensor, logits: Tensor, anchors: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Check shapes and values once per batch (one device sync) and return plain per-image tensors."""
    if loc.dim() != 3 or loc.shape[2] != 4:
        raise ValueError(f"loc: expected [N, A, 4], got {tuple(loc.shape)}")
    n, num_anchors = loc.shape[:2]
    if logits.dim() != 3 or logits.shape[:2] != loc.shape[:2]:
        raise ValueError(
            f"logits: expected [N, A, C] with N, A = {n}, {num_anchors}, got {tuple(logits.shape)}"
        )
    if anchors.shape != (num_anchors, 4):
        raise ValueError(f"anchors: expected [{num_anchors}, 4] (cx, cy, w, h), got {tuple(anchors.shape)}")
    if len(targets) != n:
        raise ValueError(f"got {len(targets)} targets for a batch of {n} images")
    boxes, labels = [], []
    for i, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(
                f"targets[{i}]: needs 'boxes' (normalised xyxy) and 'labels', has {sorted(target)}"
            )
        image_boxes = torch.as_tensor(target["boxes"]).as_subclass(Tensor)
        image_labels = torch.as_tensor(target["labels"]).as_subclass(Tensor)
        if image_boxes.numel() == 0:  # `[]` is a common way of saying "no boxes"
            image_boxes = image_boxes.reshape(0, 4)
        if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes']: expected [K, 4], got {tuple(image_boxes.shape)}")
        if image_labels.shape != image_boxes.shape[:1]:
            raise ValueError(
                f"targets[{i}]['labels']: expected [{image_boxes.shape[0]}] to go with the boxes, "
                f"got {tuple(image_labels.shape)}"
            )
        if image_labels.is_floating_point() and image_labels.numel():
            raise ValueError(f"targets[{i}]['labels']: expected integers, got {image_labels.dtype}")
        boxes.append(image_boxes.to(device=anchors.device, dtype=anchors.dtype))
        labels.append(image_labels.to(device=anchors.device, dtype=torch.int64))
    _check_values(boxes, labels, logits.shape[2])
    return boxes, labels


def _check_values(boxes: list[Tensor], labels: list[Tensor], num_classes: int) -> None:
    """Raise for labels outside 1..C-1 and for boxes that are not finite with positive width and height."""

    def bad_label(lab: Tensor) -> Tensor:
        return (lab < 1) | (lab >= num_classes)

    def bad_box(box: Tensor) -> Tensor:
        return ~torch.isfinite(box).all(dim=1) | (box[:, 2] <= box[:, 0]) | (box[:, 3] <= box[:, 1])

    if not boxes:
        return
    all_boxes, all_labels = torch.cat(boxes), torch.cat(labels)
    if not bool(bad_label(all_labels).any() | bad_box(all_boxes).any()):
        return
    for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
        wrong = bad_label(image_labels).nonzero().flatten().tolist()
        if wrong:
            raise ValueError(
                f"targets[{i}]['labels']: labels must be in 1..{num_classes - 1} (0 is background), "
                f"got {image_labels[wrong[0]].item()} at index {wrong[0]}"
            )
        wrong = bad_box(image_boxes).nonzero().flatten().tolist()
        if wrong:
            raise ValueError(
                f"targets[{i}]['boxes']: box {wrong[0]} is {image_boxes[wrong[0]].tolist()}; expected "
                "finite xyxy with x2 > x1 and y2 > y1"
            )
