"""SSD anchor matching: every anchor takes the ground truth it overlaps most, every truth its best anchor.

Batched: the ground truth of all images is concatenated and padded, so nothing loops over images, boxes
or anchors in Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou


class AnchorMatcher:
    """Assign each anchor a ground-truth box and label, or background (label 0).

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

    def __call__(
        self, boxes: Sequence[Tensor], labels: Sequence[Tensor], anchors: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Match a batch.

        Args:
            boxes: per image, `[K_i, 4]` xyxy ground truth (same units as the anchors).
            labels: per image, `[K_i]` int64 labels (1..C-1).
            anchors: `[A, 4]` xyxy.

        Returns:
            `(matched_boxes [N, A, 4], matched_labels [N, A])`: the xyxy box each anchor is assigned
            (meaningful where the label is > 0) and its label, 0 for background.
        """
        n, num_anchors = len(boxes), anchors.shape[0]
        if len(labels) != n:
            raise ValueError(f"got {n} box tensors but {len(labels)} label tensors")
        if n == 0:
            return anchors.new_zeros((0, num_anchors, 4)), anchors.new_zeros(
                (0, num_anchors), dtype=torch.int64
            )
        counts = [int(b.shape[0]) for b in boxes]
        k = max([1, *counts])
        flat_boxes = torch.cat(list(boxes)).to(anchors.dtype)
        slots = padded_slots(counts, k, anchors.device)

        # IoU of only the real boxes, scattered into [N, K, A]; padding (-1) never beats a real box
        iou = anchors.new_full((n * k, num_anchors), -1.0)
        iou = iou.index_copy_(0, slots, box_iou(flat_boxes, anchors)).reshape(n, k, num_anchors)
        gt_boxes = anchors.new_tensor([0.0, 0.0, 1.0, 1.0]).repeat(n * k, 1)  # unit box: encodes finitely
        gt_boxes = gt_boxes.index_copy_(0, slots, flat_boxes).reshape(n, k, 4)
        gt_labels = torch.zeros(n * k, dtype=torch.int64, device=anchors.device)
        gt_labels = gt_labels.index_copy_(0, slots, torch.cat(list(labels)).long()).reshape(n, k)
        valid = torch.zeros(n * k, dtype=torch.bool, device=anchors.device)
        valid = valid.index_fill_(0, slots, True).reshape(n, k)

        best_iou, best_truth = iou.max(dim=1)  # [N, A]: per anchor, its best truth
        best_anchor = iou.argmax(dim=2)  # [N, K]: per truth, its best anchor
        truth_index = torch.arange(k, device=anchors.device).expand(n, k).masked_fill(~valid, -1)
        # amax makes "the later box wins" deterministic where several truths share a best anchor
        forced_truth = torch.full((n, num_anchors), -1, dtype=torch.int64, device=anchors.device)
        forced_truth.scatter_reduce_(1, best_anchor, truth_index, reduce="amax")
        forced = forced_truth >= 0

        best_truth = torch.where(forced, forced_truth, best_truth)
        best_iou = best_iou.masked_fill(forced, 2.0)
        matched_labels = gt_labels.gather(1, best_truth).masked_fill(best_iou < self.iou_threshold, 0)
        matched_boxes = gt_boxes.gather(1, best_truth[:, :, None].expand(n, num_anchors, 4))
        return matched_boxes, matched_labels


def padded_slots(counts: Sequence[int], width: int, device: torch.device) -> Tensor:
    """Row of each concatenated box in an `[N * width]` padded layout (image i's boxes from i * width)."""
    counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
    image = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t)
    first = torch.cumsum(counts_t, 0) - counts_t
    return image * width + torch.arange(int(sum(counts)), device=device) - first[image]
