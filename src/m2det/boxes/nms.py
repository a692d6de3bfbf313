"""Soft-NMS (Bodla et al. 2017, linear and Gaussian kernels) as batched tensor operations.

Hard NMS is torchvision's (`torchvision.ops.batched_nms`); this module adds the soft variants,
which torchvision lacks. The greedy selection is inherently sequential, so the loop runs over
*selection steps*: each step picks, in every group at once, the live box with the highest score,
then decays the scores of the rest of each group by their overlap with that group's pick. Every
step is a handful of vector operations over all candidates.

Cost: with n candidates in G groups and at most K picks per group, time is O(K * n) vector work
(K Python iterations) and memory O(n + G); no n x n IoU matrix is ever built, so 10,000 candidates
in one group cost the same memory as 10,000 spread over 80 groups. Without a cap, K is the size of
the largest group.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

SOFT_NMS_METHODS = ("linear", "gaussian")


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    method: str = "linear",
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_floor: float = 0.001,
    max_per_group: Optional[int] = None,
    offset: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS applied independently within each group of `idxs` (e.g. one group per class and image).

    Args:
        boxes: `[n, 4]` xyxy.
        scores: `[n]`.
        idxs: `[n]` integer group of each box; boxes in different groups never interact.
        method: "linear" (decay by `1 - IoU` when IoU > `iou_threshold`) or "gaussian" (decay by
            `exp(-IoU^2 / sigma)` for every overlapping box).
        score_floor: a box whose decayed score falls below it is dropped.
        max_per_group: stop after this many picks per group. The picks come out in non-increasing
            score order, so this equals running to the end and keeping each group's first picks.
        offset: 1 for the legacy pixel convention, where a box spans `x2 - x1 + 1` pixels (the
            official M2Det code); 0 for continuous coordinates.

    Returns:
        `(keep, new_scores)`: indices into `boxes` of the kept boxes and their decayed scores, sorted
        by decreasing score (ties keep the order of selection). Ties during selection go to the
        lowest index; the scalar reference loop reorders its array as it drops boxes, so it may
        break exact ties differently.
    """
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"soft-NMS method must be one of {SOFT_NMS_METHODS}, got {method!r}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [n, 4] (xyxy), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1] or idxs.shape != boxes.shape[:1]:
        raise ValueError(
            f"scores {tuple(scores.shape)} and idxs {tuple(idxs.shape)} must be [n] for boxes {tuple(boxes.shape)}"
        )
    if max_per_group is not None and max_per_group < 0:
        raise ValueError(f"max_per_group must be >= 0 or None, got {max_per_group}")
    n = scores.numel()
    device = scores.device
    if n == 0 or max_per_group == 0:
        return torch.empty(0, dtype=torch.int64, device=device), scores.new_empty(0)

    # Thresholds in the scores' precision, as the reference float32 loop compares them.
    dtype = scores.dtype
    nt = torch.tensor(iou_threshold, dtype=dtype, device=device)
    sig = torch.tensor(sigma, dtype=dtype, device=device)
    floor = torch.tensor(score_floor, dtype=dtype, device=device)

    _, group = torch.unique(idxs, return_inverse=True)  # compact ids 0..G-1
    num_groups = int(group.max()) + 1
    coords = boxes.to(dtype).t().contiguous()  # [4, n]: each coordinate contiguous
    x1, y1, x2, y2 = coords
    areas = (x2 - x1 + offset) * (y2 - y1 + offset)
    current = scores.clone()
    alive = torch.ones(n, dtype=torch.bool, device=device)
    positions = torch.arange(n, device=device)
    past_end = torch.full_like(positions, n)
    no_pick = torch.full((num_groups,), n, dtype=torch.int64, device=device)
    pick_of_group = torch.full((num_groups,), -1, dtype=torch.int64, device=device)
    minus_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    no_score = torch.full((num_groups,), float("-inf"), dtype=dtype, device=device)

    # index_select rather than tensor[index]: the latter is many times slower on CPU for this shape
    kept: list[Tensor] = []
    kept_scores: list[Tensor] = []
    steps = n if max_per_group is None else min(n, max_per_group)
    for _ in range(steps):
        live_scores = torch.where(alive, current, minus_inf)
        best = no_score.scatter_reduce(0, group, live_scores, "amax")
        is_best = alive & (live_scores == best.index_select(0, group))
        pick = no_pick.scatter_reduce(0, group, torch.where(is_best, positions, past_end), "amin")
        pick = pick.masked_select(pick < n)
        if pick.numel() == 0:
            break
        kept.append(pick)
        kept_scores.append(current.index_select(0, pick))
        alive.index_fill_(0, pick, False)

        # Each live box is compared with the pick of its own group (groups without a pick: none).
        pick_of_group.fill_(-1).scatter_(0, group.index_select(0, pick), pick)
        ref = pick_of_group.index_select(0, group)
        has_ref = ref >= 0
        ref = ref.clamp(min=0)
        rx1, ry1, rx2, ry2 = coords.index_select(1, ref)
        iw = torch.minimum(rx2, x2) - torch.maximum(rx1, x1) + offset
        ih = torch.minimum(ry2, y2) - torch.maximum(ry1, y1) + offset
        touched = alive & has_ref & (iw > 0) & (ih > 0)
        inter = iw * ih
        iou = inter / (areas.index_select(0, ref) + areas - inter)
        if method == "linear":
            weight = torch.where(iou > nt, 1 - iou, torch.ones_like(iou))
        else:
            # exp in double then rounded, as the reference computes it
            weight = torch.exp((-(iou * iou) / sig).double()).to(dtype)
        current = torch.where(touched, weight * current, current)
        alive &= ~(touched & (current < floor))

    keep = torch.cat(kept)
    new_scores = torch.cat(kept_scores)
    order = torch.argsort(new_scores, descending=True, stable=True)
    return keep.index_select(0, order), new_scores.index_select(0, order)


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    method: str = "linear",
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_floor: float = 0.001,
    max_kept: Optional[int] = None,
    offset: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Soft-NMS over one set of boxes; see `batched_soft_nms` for the arguments and the result."""
    idxs = torch.zeros(scores.shape, dtype=torch.int64, device=scores.device)
    return batched_soft_nms(
        boxes, scores, idxs, method, iou_threshold, sigma, score_floor, max_per_group=max_kept, offset=offset
    )
