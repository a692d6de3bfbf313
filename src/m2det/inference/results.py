"""Detections as JSON-ready records: ours (xyxy boxes with class names) and the COCO results format.

Rounding keeps the files small (0.01 px in boxes, 1e-5 in scores); COCO metrics are taken on the
rounded values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor


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
    """COCO results entries for one image's tensors: xyxy pixel `boxes`, `scores`, 1-based `labels`."""
    return [
        coco_result(box, score, label, image_id, category_ids)
        for box, score, label in zip(
            boxes.detach().float().cpu().tolist(), scores.float().cpu().tolist(), labels.cpu().tolist()
        )
    ]


def coco_result(
    box: Sequence[float], score: float, label: int, image_id: int, category_ids: Sequence[int]
) -> dict[str, Any]:
    """One COCO results entry: the xyxy pixel `box` as [x, y, width, height], the 1-based `label`
    mapped to the data set's `category_ids`."""
    x1, y1, x2, y2 = box
    return {
        "image_id": image_id,
        "category_id": category_ids[label - 1],
        "bbox": [round(v, 2) for v in (x1, y1, x2 - x1, y2 - y1)],
        "score": round(score, 5),
    }
