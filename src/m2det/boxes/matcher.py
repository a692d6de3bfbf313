"""Anchor matching: SSD's rule (every anchor takes the ground truth it overlaps most if at least 0.5,
every truth its best anchor) and, as an option, ATSS's adaptive IoU threshold.

Batched: the ground truth of all images is concatenated and padded, so nothing loops over images, boxes
or anchors in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torchvision.ops import box_iou


class Matcher:
    """Assign each anchor a ground-truth box and label, or background (label 0); a rule overrides `match`."""

    def __call__(
        self,
        boxes: Sequence[Tensor],
        labels: Sequence[Tensor],
        anchors: Tensor,
        level_sizes: Optional[Sequence[int]] = None,
    ) -> tuple[Tensor, Tensor]:
        """Match a batch.

        Args:
            boxes: per image, `[K_i, 4]` xyxy ground truth (same units as the anchors).
            labels: per image, `[K_i]` int64 labels (1..C-1).
            anchors: `[A, 4]` xyxy.
            level_sizes: how many anchors each pyramid level holds, in order (for rules that need it).

        Returns:
            `(matched_boxes [N, A, 4], matched_labels [N, A])`: the xyxy box each anchor is assigned
            (meaningful where the label is > 0) and its label, 0 for background.
        """
        truth = PaddedTruth.of(boxes, labels, anchors)
        if truth is None:
            num_anchors = anchors.shape[0]
            return anchors.new_zeros((0, num_anchors, 4)), anchors.new_zeros(
                (0, num_anchors), dtype=torch.int64
            )
        return self.match(truth, anchors, level_sizes)

    def match(
        self, truth: PaddedTruth, anchors: Tensor, level_sizes: Optional[Sequence[int]]
    ) -> tuple[Tensor, Tensor]:
        """The rule, on a batch of at least one image (see `__call__`)."""
        raise NotImplementedError


class AnchorMatcher(Matcher):
    """SSD's rule.

    As in SSD and the official M2Det code: an anchor whose best IoU is below `iou_threshold` is
    background, and each ground truth is also forced onto the anchor it overlaps most (its IoU
    counted as 2, so it survives the threshold) so that every box gets at least one positive. When
    two boxes pick the same anchor, the later box (higher index) wins. An image without boxes gets
    all anchors as background.
    """

    def __init__(self, iou_threshold: float = 0.5):
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = float(iou_threshold)

    def match(
        self, truth: PaddedTruth, anchors: Tensor, level_sizes: Optional[Sequence[int]]
    ) -> tuple[Tensor, Tensor]:
        n, k, num_anchors = truth.iou.shape
        iou = truth.iou
        best_iou, best_truth = iou.max(dim=1)  # [N, A]: per anchor, its best truth
        best_anchor = iou.argmax(dim=2)  # [N, K]: per truth, its best anchor
        truth_index = torch.arange(k, device=anchors.device).expand(n, k).masked_fill(~truth.valid, -1)
        # amax makes "the later box wins" deterministic where several truths share a best anchor
        forced_truth = torch.full((n, num_anchors), -1, dtype=torch.int64, device=anchors.device)
        forced_truth.scatter_reduce_(1, best_anchor, truth_index, reduce="amax")
        forced = forced_truth >= 0

        best_truth = torch.where(forced, forced_truth, best_truth)
        best_iou = best_iou.masked_fill(forced, 2.0)
        return truth.assign(best_truth, ~(best_iou < self.iou_threshold))


class ATSSMatcher(Matcher):
    """Adaptive training sample selection (Zhang et al., "Bridging the Gap Between Anchor-based and
    Anchor-free Detection", CVPR 2020): the IoU threshold adapts to each ground-truth box.

    Per box: on each pyramid level the `topk` anchors whose centres are nearest the box's centre
    are candidates; the box's threshold is the mean plus the standard deviation (with Bessel's
    correction, as the reference code) of the candidates' IoUs; a candidate at or above it whose
    centre lies strictly inside the box is positive. An anchor positive for several boxes takes the
    one it overlaps most. Beside the reference: a box left without any positive (a small box with no
    anchor centre inside) gets its highest-IoU anchor, as SSD's rule forces one, so no box goes
    unlearned. The anchors of each level must be contiguous, `level_sizes` giving their counts.
    """

    def __init__(self, topk: int = 9):
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = int(topk)

    def match(
        self, truth: PaddedTruth, anchors: Tensor, level_sizes: Optional[Sequence[int]]
    ) -> tuple[Tensor, Tensor]:
        if level_sizes is None or sum(level_sizes) != anchors.shape[0]:
            raise ValueError(
                f"ATSSMatcher needs the number of anchors of each pyramid level, summing to "
                f"{anchors.shape[0]}; got {None if level_sizes is None else list(level_sizes)}"
            )
        iou, gt_boxes = truth.iou, truth.boxes
        anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2]
        gt_centres = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [N, K, 2]
        distance = (gt_centres[:, :, None, :] - anchor_centres).square().sum(-1)  # [N, K, A]
        candidates, start = [], 0
        for size in level_sizes:
            nearest = distance[..., start : start + size].topk(min(self.topk, size), dim=2, largest=False)
            candidates.append(nearest.indices + start)
            start += size
        candidate = torch.cat(candidates, dim=2)  # [N, K, C]
        candidate_iou = iou.gather(2, candidate)
        threshold = candidate_iou.mean(2) + torch.nan_to_num(candidate_iou.std(2))  # one candidate: no std
        centres = anchor_centres[candidate]  # [N, K, C, 2]
        inside = (centres > gt_boxes[..., None, :2]).all(-1) & (centres < gt_boxes[..., None, 2:]).all(-1)
        chosen = (candidate_iou >= threshold[..., None]) & inside & truth.valid[..., None]
        positive = torch.zeros_like(iou, dtype=torch.bool).scatter_(2, candidate, chosen)  # [N, K, A]
        lonely = truth.valid & ~positive.any(2)
        positive |= torch.zeros_like(positive).scatter_(2, iou.argmax(2, keepdim=True), lonely[..., None])
        best_iou, best_truth = iou.masked_fill(~positive, -1.0).max(dim=1)  # [N, A]
        return truth.assign(best_truth, positive.any(1))


@dataclass
class PaddedTruth:
    """A batch's ground truth padded to `K` boxes per image, with the IoU of every box and anchor.

    Padding rows have IoU -1 (no real box loses to them), the unit box (which encodes finitely)
    and label 0; `valid` marks the real rows.
    """

    iou: Tensor  # [N, K, A]
    boxes: Tensor  # [N, K, 4]
    labels: Tensor  # [N, K]
    valid: Tensor  # [N, K]

    @classmethod
    def of(cls, boxes: Sequence[Tensor], labels: Sequence[Tensor], anchors: Tensor) -> Optional[PaddedTruth]:
        """Pad a batch (None for a batch of no images)."""
        n, num_anchors = len(boxes), anchors.shape[0]
        if len(labels) != n:
            raise ValueError(f"got {n} box tensors but {len(labels)} label tensors")
        if n == 0:
            return None
        counts = [int(b.shape[0]) for b in boxes]
        k = max([1, *counts])
        flat_boxes = torch.cat(list(boxes)).to(anchors.dtype)
        slots = padded_slots(counts, k, anchors.device)
        # IoU of only the real boxes, scattered into [N, K, A]
        iou = anchors.new_full((n * k, num_anchors), -1.0)
        iou = iou.index_copy_(0, slots, box_iou(flat_boxes, anchors)).reshape(n, k, num_anchors)
        gt_boxes = anchors.new_tensor([0.0, 0.0, 1.0, 1.0]).repeat(n * k, 1)
        gt_boxes = gt_boxes.index_copy_(0, slots, flat_boxes).reshape(n, k, 4)
        gt_labels = torch.zeros(n * k, dtype=torch.int64, device=anchors.device)
        gt_labels = gt_labels.index_copy_(0, slots, torch.cat(list(labels)).long()).reshape(n, k)
        valid = torch.zeros(n * k, dtype=torch.bool, device=anchors.device)
        valid = valid.index_fill_(0, slots, True).reshape(n, k)
        return cls(iou, gt_boxes, gt_labels, valid)

    def assign(self, truth_of_anchor: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
        """`(matched_boxes [N, A, 4], matched_labels [N, A])` for each anchor's truth index `[N, A]`,
        the label 0 where `positive` is False."""
        n, num_anchors = truth_of_anchor.shape
        labels = self.labels.gather(1, truth_of_anchor).masked_fill(~positive, 0)
        boxes = self.boxes.gather(1, truth_of_anchor[:, :, None].expand(n, num_anchors, 4))
        return boxes, labels


def padded_slots(counts: Sequence[int], width: int, device: torch.device) -> Tensor:
    """Row of each concatenated box in an `[N * width]` padded layout (image i's boxes from i * width)."""
    counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
    image = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t)
    first = torch.cumsum(counts_t, 0) - counts_t
    return image * width + torch.arange(int(sum(counts)), device=device) - first[image]
