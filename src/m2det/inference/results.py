"""Detections as JSON-ready records: ours (xyxy boxes with class names) and the COCO results format.

Rounding keeps the files small (0.01 px in boxes, 1e-5 in scores); COCO metrics are taken on the
rounded values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torchvision.ops import box_convert


def detection_records(result: dict[str, Any], min_score: float = 0.0) -> list[dict[str, Any]]:
    """One dict per detection of a `Detector` result: `box` [x1, y1, x2, y2] in pixels, `score`,
    `label` and `name`; detections scoring under `min_score` are left out."""
    keep = (result["scores"] >= min_score).tolist()
    rows = zip(
        result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist(), result["label_names"]
    )
    return [
        {"box": [round(v, 2) for v in box], "score": round(score, 5), "label": label, "name": name}
        for (box, score, label, name), kept in zip(rows, keep)
        if kept
    ]


def coco_results(
    boxes: Tensor, scores: Tensor, labels: Tensor, image_id: int, category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO results entries for one image: xyxy pixel `boxes` as [x, y, width, height], 1-based
    `labels` mapped to the data set's `category_ids`."""
    xywh = box_convert(boxes.detach().float().cpu(), "xyxy", "xywh")
    return [
        {
            "image_id": image_id,
            "category_id": category_ids[label - 1],
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        for box, score, label in zip(xywh.tolist(), scores.float().cpu().tolist(), labels.cpu().tolist())
    ]
