"""From raw predictions to detections: decode, softmax, score filter, per-class NMS, caps.

Batched over images and classes: every (image, class) pair is one NMS group, so one call of the
NMS kernel serves the whole batch. Two named settings: `PAPER` (what the paper states) and
`OFFICIAL` (what the released code evaluates with, reproduced exactly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from m2det.boxes.coder import BoxCoder
from m2det.boxes.nms import SOFT_NMS_METHODS, batched_soft_nms
from m2det.errors import ConfigError

NMS_METHODS = ("hard", *SOFT_NMS_METHODS)


@dataclass(frozen=True)
class PostprocessSettings:
    """How raw predictions become detections.

    `score_threshold` selects the candidates (scores above it) that enter NMS; `min_score` is the
    lowest score a returned detection has, applied after NMS, where soft-NMS has lowered the scores
    of overlapping boxes (0: everything NMS keeps, as evaluation wants for AP).
    `nms` is "linear" or "gaussian" soft-NMS, or "hard" (torchvision NMS at `iou_threshold`).
    Soft-NMS decays by overlap above `soft_iou_threshold` (linear) or with `sigma` (Gaussian) and
    drops boxes whose score falls below `score_floor`. `plus_one` is the legacy pixel convention
    (a box spans `x2 - x1 + 1` pixels) used by the official code; `clip` clips boxes to the image.
    The per-image cap keeps the `max_per_image` best boxes, or with `cap_keeps_ties` (the official
    rule) every box scoring at least the `max_per_image`-th best score.
    """

    score_threshold: float = 0.05
    min_score: float = 0.0  # after NMS: detections scoring below it are not returned
    nms: str = "linear"
    soft_iou_threshold: float = 0.3
    sigma: float = 0.5
    score_floor: float = 0.001
    iou_threshold: float = 0.45
    pre_nms_top_k: Optional[int] = None  # per class and image, before NMS
    max_per_class: Optional[int] = 50
    max_per_image: Optional[int] = 300
    plus_one: bool = False
    clip: bool = True
    cap_keeps_ties: bool = False  # per-image cap keeps every score equal to the last one kept

    def __post_init__(self) -> None:
        if self.nms not in NMS_METHODS:
            raise ConfigError(f"nms must be one of {NMS_METHODS}, got {self.nms!r}")
        for name in ("score_threshold", "min_score", "soft_iou_threshold", "iou_threshold", "score_floor"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if self.sigma <= 0:
            raise ConfigError(f"sigma must be > 0, got {self.sigma}")
        for name in ("pre_nms_top_k", "max_per_class", "max_per_image"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 or None, got {value}")

    def replace(self, **changes: object) -> PostprocessSettings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# The paper: score threshold 0.05 and linear soft-NMS; what it leaves open follows the released code,
# except a cap of 300 detections per image (ours), which bounds the size of results (COCOeval reads
# at most 100 per image).
PAPER = PostprocessSettings()

# The released code's test: score > 0.1, linear soft-NMS (Nt 0.3, floor 0.001), 50 per class, "+1"
# areas, boxes not clipped, and no per-image cap: its per-image cut runs only for `topk > 0`, and the
# released configs set `topk = 0`. With a cap set (`.replace(max_per_image=N)`), its rule keeps every
# box tying the N-th score. Its config's `iou=0.45` is the hard-NMS threshold when soft-NMS is off,
# and with soft-NMS on lands in the sigma argument, hence sigma 0.45 here.
OFFICIAL = PostprocessSettings(
    score_threshold=0.1, sigma=0.45, max_per_image=None, plus_one=True, clip=False, cap_keeps_ties=True
)

SETTINGS: dict[str, PostprocessSettings] = {"paper": PAPER, "official": OFFICIAL}


def get_settings(settings: Union[str, PostprocessSettings]) -> PostprocessSettings:
    """Settings by name ("paper", "official"), or the settings object itself."""
    if isinstance(settings, PostprocessSettings):
        return settings
    key = str(settings).strip().lower()
    if key not in SETTINGS:
        raise ConfigError(
            f"unknown post-processing settings {settings!r}; expected one of {sorted(SETTINGS)}"
        )
    return SETTINGS[key]


@dataclass
class Candidates:
    """Scored boxes of a batch that passed the score filter, flat: one row per (image, anchor, class)."""

    image_index: Tensor  # [n] int64
    boxes: Tensor  # [n, 4] xyxy pixels of the original image
    scores: Tensor  # [n]
    labels: Tensor  # [n] int64, 1..C-1

    @classmethod
    def cat(cls, parts: Sequence[Candidates]) -> Candidates:
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)))

    def take(self, index: Tensor) -> Candidates:
        """The rows at `index` (index_select: far faster than tensor[index] on CPU)."""
        return Candidates(*(getattr(self, f.name).index_select(0, index) for f in dataclasses.fields(self)))


class PostProcessor:
    """Raw `(loc, logits)` of a batch -> one dict per image: `boxes` (xyxy, original pixels), `scores`, `labels`.

    Three stages, usable apart (multi-scale testing merges several `candidates` before `suppress`):
    `decode` -> `candidates` -> `suppress`. With `categories` (names by label, background at 0),
    each dict also has `label_names`.
    """

    def __init__(
        self,
        box_coder: BoxCoder,
        settings: Union[str, PostprocessSettings] = PAPER,
        categories: Optional[Sequence[str]] = None,
    ):
        self.box_coder = box_coder
        self.settings = get_settings(settings)
        self.categories = list(categories) if categories is not None else None

    def __call__(
        self, loc: Tensor, logits: Tensor, anchors: Tensor, sizes: Sequence[tuple[int, int]]
    ) -> list[dict]:
        boxes, probs = self.decode(loc, logits, anchors, sizes)
        return self.suppress(self.candidates(boxes, probs), len(sizes))

    def decode(
        self, loc: Tensor, logits: Tensor, anchors: Tensor, sizes: Sequence[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """Boxes `[N, A, 4]` in each original image's pixels and class probabilities `[N, A, C]`."""
        if loc.dim() != 3 or loc.shape[-1] != 4 or logits.shape[:2] != loc.shape[:2]:
            raise ValueError(
                f"expected loc [N, A, 4] and logits [N, A, C], got {tuple(loc.shape)} and {tuple(logits.shape)}"
            )
        if anchors.shape != loc.shape[1:]:
            raise ValueError(f"anchors {tuple(anchors.shape)} do not match loc {tuple(loc.shape)}")
        if len(sizes) != loc.shape[0]:
            raise ValueError(f"got {len(sizes)} image sizes for a batch of {loc.shape[0]}")
        loc = loc.float()
        scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=loc.dtype, device=loc.device)[:, None]
        boxes = self.box_coder.decode(loc, anchors.to(loc)) * scale
        if self.settings.clip:
            boxes = torch.minimum(boxes.clamp(min=0), scale)
        return boxes, logits.float().softmax(dim=-1)

    def candidates(self, boxes: Tensor, probs: Tensor) -> Candidates:
        """The (image, anchor, class) triples scoring above the threshold, background excluded, and
        boxes that are not finite (offsets so large that exp overflows, as random weights give)."""
        _, num_anchors, num_classes = probs.shape
        above = (probs > self.settings.score_threshold) & torch.isfinite(boxes).all(dim=-1, keepdim=True)
        above[..., 0] = False
        flat = above.view(-1).nonzero().squeeze(1)  # in (image, anchor, class) order
        box_index = torch.div(flat, num_classes, rounding_mode="floor")
        return Candidates(
            image_index=torch.div(box_index, num_anchors, rounding_mode="floor"),
            boxes=boxes.reshape(-1, 4).index_select(0, box_index),
            scores=probs.reshape(-1).index_select(0, flat),
            labels=flat % num_classes,
        )

    def suppress(self, found: Candidates, num_images: int) -> list[dict]:
        """Per-class top-k, NMS within each (image, class), per-class cap, `min_score`, per-image cap."""
        s = self.settings
        num_labels = int(found.labels.max()) + 1 if found.labels.numel() else 1
        groups = found.image_index * num_labels + found.labels
        if s.pre_nms_top_k is not None:
            top = top_k_per_group(found.scores, groups, s.pre_nms_top_k).nonzero().squeeze(1)
            found, groups = found.take(top), groups.index_select(0, top)
        offset = 1.0 if s.plus_one else 0.0
        if s.nms == "hard":
            # IoU with "+1" areas equals the plain IoU of boxes grown by one pixel at x2, y2
            grown = found.boxes + found.boxes.new_tensor([0.0, 0.0, offset, offset])
            keep = batched_nms(grown, found.scores, groups, s.iou_threshold)
            if s.max_per_class is not None:
                capped = top_k_per_group(
                    found.scores.index_select(0, keep), groups.index_select(0, keep), s.max_per_class
                )
                keep = keep.masked_select(capped)
            kept = found.take(keep)
        else:
            keep, scores = batched_soft_nms(
                found.boxes,
                found.scores,
                groups,
                method=s.nms,
                iou_threshold=s.soft_iou_threshold,
                sigma=s.sigma,
                score_floor=s.score_floor,
                max_per_group=s.max_per_class,
                offset=offset,
            )
            kept = found.take(keep)
            kept.scores = scores
        return [
            self._image_result(kept.take((kept.image_index == i).nonzero().squeeze(1)))
            for i in range(num_images)
        ]

    def _image_result(self, found: Candidates) -> dict:
        cap = self.settings.max_per_image
        if self.settings.min_score > 0:
            found = found.take((found.scores >= self.settings.min_score).nonzero().squeeze(1))
        found = found.take(torch.argsort(found.scores, descending=True, stable=True))
        if cap is not None and found.scores.numel() > cap:
            if self.settings.cap_keeps_ties:
                cap = int((found.scores >= found.scores[cap - 1]).sum())
            found = found.take(torch.arange(cap, device=found.scores.device))
        result: dict[str, Any] = {"boxes": found.boxes, "scores": found.scores, "labels": found.labels}
        if self.categories is not None:
            result["label_names"] = [self.categories[label] for label in found.labels.tolist()]
        return result


def top_k_per_group(scores: Tensor, groups: Tensor, k: int) -> Tensor:
    """Boolean mask of the `k` highest scores within each group (ties: the earlier index first)."""
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    order = torch.argsort(scores, descending=True, stable=True)
    order = order.index_select(0, torch.argsort(groups.index_select(0, order), stable=True))
    _, counts = torch.unique_consecutive(groups.index_select(0, order), return_counts=True)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    rank = torch.arange(order.numel(), device=scores.device) - starts
    return torch.zeros_like(scores, dtype=torch.bool).index_copy_(0, order, rank < k)
