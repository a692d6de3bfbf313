"""Pascal VOC average precision: per-class AP at one IoU threshold, 2007 11-point and area variants.

The rules are those of the VOC devkit (``VOCevaldet.m``): detections of a class are taken by
descending score; each one is compared with the ground truth of its class in its image that it
overlaps most; at IoU >= the threshold it is a true positive if that box is not difficult and not
yet taken, a false positive if it is already taken, and ignored (neither) if the box is difficult;
below the threshold, or with no box of its class in the image, it is a false positive. Difficult
boxes do not count towards recall.

Pixel convention: with ``pixel_inclusive=True`` (the devkit's, meant for VOC's integer pixel-index
boxes) a box ``x1..x2`` covers ``x2 - x1 + 1`` pixels, which enters every area and intersection;
with ``False`` boxes are continuous coordinates (COCO's convention, torchvision's ``box_iou``).

Ties in score keep the input order (a stable sort, as MATLAB's ``sort`` is). The 11 recall points
are exactly 0, 0.1, ..., 1.0 (so a recall of 3/10 reaches the 0.3 point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from torchvision.ops import box_iou


@dataclass
class VOCClassResult:
    """One class: its precision-recall curve (ignored detections left out) and both APs.

    APs are NaN when the class has no non-difficult ground truth (recall is undefined).
    """

    label: int
    num_gt: int
    num_detections: int
    recall: Tensor
    precision: Tensor
    ap07: float
    ap: float


def _as_tensor(value: Any, dtype: torch.dtype, name: str, width: Optional[int] = None) -> Tensor:
    tensor = torch.as_tensor(value, dtype=dtype).detach().cpu()
    if width is not None and tensor.numel() == 0:
        tensor = tensor.reshape(0, width)
    tail = () if width is None else (width,)
    if tensor.dim() != 1 + len(tail) or tuple(tensor.shape[1:]) != tail:
        expected = "[N]" if width is None else f"[N, {width}]"
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")
    return tensor


def voc_ap(recall: Tensor, precision: Tensor, use_07_metric: bool = False) -> float:
    """AP from a precision-recall curve (points by descending score; recall non-decreasing).

    2007: mean over recall points t = 0, 0.1, ..., 1 of the best precision at recall >= t (0 if
    none). 2010+: area under the curve after making precision non-increasing in recall.
    """
    recall = torch.as_tensor(recall, dtype=torch.float64)
    precision = torch.as_tensor(precision, dtype=torch.float64)
    if recall.numel() == 0:
        return 0.0
    # best precision at this point or any later one (i.e. at any higher recall)
    envelope = precision.flip(0).cummax(0).values.flip(0)
    if use_07_metric:
        points = torch.arange(11, dtype=torch.float64) / 10
        first = torch.searchsorted(recall, points, side="left")
        padded = torch.cat([envelope, envelope.new_zeros(1)])
        return float(padded[first].mean())
    widths = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((widths * envelope).sum())


def match_detections(
    det_images: Tensor,
    det_boxes: Tensor,
    det_labels: Tensor,
    gt_images: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    pixel_inclusive: bool = True,
) -> tuple[Tensor, Tensor]:
    """For each detection, the index of the same-image same-class ground truth it overlaps most
    (first on ties) and that IoU; ``(-1, 0.0)`` where there is none."""
    best_gt = torch.full((len(det_boxes),), -1, dtype=torch.int64)
    best_iou = torch.zeros(len(det_boxes), dtype=torch.float64)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return best_gt, best_iou
    widen = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64) if pixel_inclusive else 0.0
    det_boxes = det_boxes.double() + widen
    gt_boxes = gt_boxes.double() + widen
    det_order = torch.argsort(det_images, stable=True)
    gt_order = torch.argsort(gt_images, stable=True)
    det_ids, det_counts = torch.unique_consecutive(det_images[det_order], return_counts=True)
    gt_ids, gt_counts = torch.unique_consecutive(gt_images[gt_order], return_counts=True)
    gt_groups = dict(zip(gt_ids.tolist(), torch.split(gt_order, gt_counts.tolist())))
    for image, dets in zip(det_ids.tolist(), torch.split(det_order, det_counts.tolist())):
        gts = gt_groups.get(image)
        if gts is None:
            continue
        iou = box_iou(det_boxes[dets], gt_boxes[gts])
        iou[det_labels[dets][:, None] != gt_labels[gts][None, :]] = -1.0
        value, index = iou.max(dim=1)
        found = value >= 0
        best_gt[dets[found]] = gts[index[found]]
        best_iou[dets[found]] = value[found]
    return best_gt, best_iou


def voc_class_ap(
    label: int,
    det_scores: Tensor,
    best_gt: Tensor,
    best_iou: Tensor,
    gt_difficult: Tensor,
    num_gt: int,
    iou_threshold: float = 0.5,
) -> VOCClassResult:
    """Greedy assignment and both APs for one class, given each detection's best ground truth."""
    order = torch.argsort(det_scores, descending=True, stable=True)
    best_gt, best_iou = best_gt[order], best_iou[order]
    hit = (best_iou >= iou_threshold) & (best_gt >= 0)
    difficult = torch.zeros_like(hit)
    difficult[hit] = gt_difficult[best_gt[hit]]
    counted = ~(hit & difficult)
    best_gt, hit = best_gt[counted], hit[counted]
    # a ground truth goes to the first (highest-scoring) detection that reaches it; later ones are FPs
    position = torch.arange(len(best_gt))
    first = torch.full((len(gt_difficult) + 1,), len(best_gt), dtype=torch.int64)
    slot = torch.where(hit, best_gt, torch.full_like(best_gt, len(gt_difficult)))
    first = first.scatter_reduce(0, slot, position, reduce="amin")
    true_positive = hit & (first[slot] == position)
    tp = true_positive.cumsum(0).double()
    fp = (~true_positive).cumsum(0).double()
    precision = tp / (tp + fp).clamp(min=1.0)
    if num_gt == 0:
        recall = torch.full_like(tp, math.nan)
        ap07 = ap = math.nan
    else:
        recall = tp / num_gt
        ap07, ap = voc_ap(recall, precision, True), voc_ap(recall, precision, False)
    return VOCClassResult(label, num_gt, len(best_gt), recall, precision, ap07, ap)


def voc_evaluate(
    det_images: Any,
    det_boxes: Any,
    det_scores: Any,
    det_labels: Any,
    gt_images: Any,
    gt_boxes: Any,
    gt_labels: Any,
    gt_difficult: Optional[Any] = None,
    *,
    labels: Optional[Sequence[int]] = None,
    iou_threshold: float = 0.5,
    pixel_inclusive: bool = True,
) -> dict[int, VOCClassResult]:
    """VOC AP per class for detections and ground truth given as flat arrays.

    ``*_images`` are integer image keys (any ids), boxes are ``[N, 4]`` xyxy in pixels, labels any
    integer class ids. ``labels`` picks the classes to report (default: all ground-truth labels).
    The mean over classes is ``mean_ap(results)``.
    """
    det_images = _as_tensor(det_images, torch.int64, "det_images")
    det_boxes = _as_tensor(det_boxes, torch.float64, "det_boxes", 4)
    det_scores = _as_tensor(det_scores, torch.float64, "det_scores")
    det_labels = _as_tensor(det_labels, torch.int64, "det_labels")
    gt_images = _as_tensor(gt_images, torch.int64, "gt_images")
    gt_boxes = _as_tensor(gt_boxes, torch.float64, "gt_boxes", 4)
    gt_labels = _as_tensor(gt_labels, torch.int64, "gt_labels")
    if gt_difficult is None:
        gt_difficult = torch.zeros(len(gt_labels), dtype=torch.bool)
    gt_difficult = _as_tensor(gt_difficult, torch.bool, "gt_difficult")
    for name, tensor, size in (
        ("det_images", det_images, len(det_boxes)),
        ("det_scores", det_scores, len(det_boxes)),
        ("det_labels", det_labels, len(det_boxes)),
        ("gt_images", gt_images, len(gt_boxes)),
        ("gt_labels", gt_labels, len(gt_boxes)),
        ("gt_difficult", gt_difficult, len(gt_boxes)),
    ):
        if len(tensor) != size:
            raise ValueError(f"{name}: has {len(tensor)} entries for {size} boxes")
    best_gt, best_iou = match_detections(
        det_images, det_boxes, det_labels, gt_images, gt_boxes, gt_labels, pixel_inclusive
    )
    if labels is None:
        labels = sorted(set(gt_labels.tolist()))
    results = {}
    for label in labels:
        mine = det_labels == label
        num_gt = int(((gt_labels == label) & ~gt_difficult).sum())
        results[int(label)] = voc_class_ap(
            int(label), det_scores[mine], best_gt[mine], best_iou[mine], gt_difficult, num_gt, iou_threshold
        )
    return results


def mean_ap(results: dict[int, VOCClassResult], use_07_metric: bool = False) -> float:
    """Mean AP over the classes that have ground truth (NaN if none has)."""
    values = [r.ap07 if use_07_metric else r.ap for r in results.values() if r.num_gt > 0]
    return sum(values) / len(values) if values else math.nan
