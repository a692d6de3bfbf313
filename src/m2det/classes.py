"""Class names: those of the public benchmarks (facts, in their usual order) and the one check that
two lists of foreground classes agree (a model and its data, training and validation data).

A top-level module, below data, io and models alike, since all three need the COCO names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# The 80 COCO category ids in the order above (the official COCO json skips some ids).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)  # fmt: skip

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


def _shown(names: Sequence[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def class_mismatch(
    first: Union[Sequence[str], int], second: Sequence[str], first_what: str, second_what: str
) -> Optional[str]:
    """How `first`'s foreground classes differ from `second`'s, as a message; None when they agree.

    `first` may be a count alone (a model without names): then only the counts are compared. The
    message names the count first, since a count mismatch cannot be fixed by renaming.
    """
    second = list(second)
    count = first if isinstance(first, int) else len(first)
    if count != len(second):
        return f"{first_what} has {count} classes but {second_what} has {len(second)} ({_shown(second)})"
    if not isinstance(first, int) and list(first) != second:
        return (
            f"{first_what}'s classes ({_shown(list(first))}) differ from {second_what}'s ({_shown(second)})"
        )
    return None
