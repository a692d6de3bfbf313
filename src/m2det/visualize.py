"""Pictures of detections: boxes in a fixed colour per class, labelled "name 0.87".

Drawing is torchvision's `draw_bounding_boxes`; this module picks the colours, the label text, a
line width and font size that stay readable at any image size.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

# Twenty well-separated colours (RGB); class label l gets PALETTE[(l - 1) % 20].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip

# A scalable font when the system has one; otherwise PIL's built-in font (fixed, small).
_FONT_CANDIDATES = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")


def class_color(label: int) -> tuple[int, int, int]:
    """The colour of a class label (1-based; background 0 wraps to the last colour)."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def label_text(label: int, score: Optional[float] = None, class_names: Optional[Sequence[str]] = None) -> str:
    """ "name 0.87": the class name (`class_names[label - 1]`, foreground names) or the label number."""
    has_name = class_names is not None and 1 <= label <= len(class_names)
    name = class_names[label - 1] if has_name else str(label)  # type: ignore[index]
    return name if score is None else f"{name} {score:.2f}"


@functools.lru_cache(maxsize=1)
def _font_file() -> Optional[str]:
    from PIL import ImageFont

    for candidate in _FONT_CANDIDATES:
        try:
            ImageFont.truetype(candidate, 10)
        except OSError:
            continue
        return candidate
    return None


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Optional[Tensor] = None,
    class_names: Optional[Sequence[str]] = None,
    width: Optional[int] = None,
    font_size: Optional[int] = None,
) -> Tensor:
    """Draw xyxy pixel `boxes` on an RGB image (uint8 CHW, or float in [0, 1]); returns uint8 CHW.

    `labels` are 1-based (0 is background) and `class_names` the foreground names, so the name of
    label l is `class_names[l - 1]`. Boxes reaching outside the image are drawn at its border.
    With `scores`, the best boxes are drawn last, so that their labels lie on top of lower ones.
    """
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be CHW with 1 or 3 channels, got {tuple(image.shape)}")
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if image.dtype != torch.uint8:
        raise ValueError(f"image must be uint8 or float, got {image.dtype}")
    boxes = torch.as_tensor(boxes, dtype=torch.float32).detach().cpu().reshape(-1, 4)
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if len(labels) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise ValueError(
            f"got {len(boxes)} boxes, {len(labels)} labels"
            + ("" if scores is None else f" and {len(scores)} scores")
            + "; expected one of each per box"
        )
    image = image.detach().cpu()
    if len(boxes) == 0:
        return image.clone() if image.shape[0] == 3 else image.expand(3, -1, -1).clone()
    height, width_px = image.shape[-2:]
    limits = boxes.new_tensor([width_px - 1, height - 1] * 2)
    boxes = torch.minimum(torch.nan_to_num(boxes).clamp(min=0), limits)
    if scores is None:
        score_list: list[Optional[float]] = [None] * len(boxes)
    else:
        score_tensor = torch.as_tensor(scores).detach().cpu().float().reshape(-1)
        order = torch.argsort(score_tensor, stable=True)  # ascending: the best drawn last, on top
        boxes, labels, score_list = boxes[order], labels[order], score_tensor[order].tolist()
    texts = [label_text(int(label), s, class_names) for label, s in zip(labels.tolist(), score_list)]
    colors = [class_color(int(label)) for label in labels.tolist()]
    side = min(height, width_px)
    font = _font_file()
    return draw_bounding_boxes(
        image,
        boxes,
        labels=texts,
        colors=colors,
        width=width or max(1, round(side / 250)),
        font=font,
        font_size=(font_size or max(10, round(side / 40))) if font else None,
        fill_labels=True,
        label_colors=[_text_color(c) for c in colors],
    )


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
