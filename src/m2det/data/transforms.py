"""The official SSD/M2Det training augmentation and the evaluation resize, as torchvision v2 transforms.

Training, in the official order: IoU crop, photometric distortion, zoom-out filled with the mean
colour, horizontal flip, resize to the square input with a random interpolation, then boxes
smaller than 1% of the side are dropped. torchvision's own transform is used wherever its
semantics are the official ones (flip, resize, sanitising); where they differ the class says how.

Every random draw comes from torch's global generator, so `torch.manual_seed(s)` before a call
fixes the augmented sample (see `m2det.data.loader` for DataLoader workers).
Inputs and outputs: `tv_tensors.Image` uint8 [3, H, W] RGB and a target dict whose `boxes` are
`tv_tensors.BoundingBoxes`; per-box `labels` and `iscrowd` are filtered along with the boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from m2det.errors import ConfigError

# The official means are BGR (104, 117, 123); our images are RGB.
MEAN_FILL_RGB: tuple[int, int, int] = (123, 117, 104)

# Official minimum IoUs between every box and the crop: None keeps the whole image, 0.0 is "any".
SSD_CROP_MIN_IOUS: tuple[Optional[float], ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)

# The official code picks one of OpenCV's LINEAR, CUBIC, AREA, NEAREST, LANCZOS4. On tensors,
# antialiased bilinear stands in for AREA and antialiased bicubic for LANCZOS4 (both low-pass
# filter when shrinking, as those do).
TRAIN_INTERPOLATIONS: tuple[tuple[v2.InterpolationMode, bool], ...] = (
    (v2.InterpolationMode.BILINEAR, False),
    (v2.InterpolationMode.BICUBIC, False),
    (v2.InterpolationMode.BILINEAR, True),
    (v2.InterpolationMode.NEAREST, False),
    (v2.InterpolationMode.BICUBIC, True),
)


@dataclass(frozen=True)
class AugmentSettings:
    """Training augmentation settings; the defaults are the official ones."""

    brightness_delta: float = 32.0  # added to 0..255 values
    contrast_range: tuple[float, float] = (0.5, 1.5)  # values multiplied by
    hue_delta: int = 18  # OpenCV uint8 HSV hue units (2 degrees each)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    crop_min_ious: tuple[Optional[float], ...] = SSD_CROP_MIN_IOUS
    crop_min_scale: float = 0.3
    expand_probability: float = 0.6
    max_expand: float = 4.0
    fill: tuple[int, int, int] = MEAN_FILL_RGB
    flip_probability: float = 0.5
    min_box_fraction: float = 0.01  # of the output side

    def __post_init__(self) -> None:
        # YAML gives lists; keep the frozen settings hashable and check every field by name
        for name in ("contrast_range", "saturation_range", "crop_min_ious", "fill"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("contrast_range", "saturation_range"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ConfigError(
                    f"AugmentSettings.{name} must be (low, high) with 0 <= low <= high, got {(low, high)}"
                )
        for name in ("expand_probability", "flip_probability", "min_box_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"AugmentSettings.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.brightness_delta < 0 or not 0 <= self.hue_delta <= 90:
            raise ConfigError("AugmentSettings.brightness_delta must be >= 0 and hue_delta in 0..90")
        if not 0 < self.crop_min_scale <= 1 or self.max_expand < 1:
            raise ConfigError("AugmentSettings.crop_min_scale must be in (0, 1] and max_expand >= 1")
        if not self.crop_min_ious or any(v is not None and not 0 <= v <= 1 for v in self.crop_min_ious):
            raise ConfigError(
                f"AugmentSettings.crop_min_ious must be IoUs in [0, 1] or None, got {self.crop_min_ious}"
            )
        if len(self.fill) != 3 or any(not 0 <= v <= 255 for v in self.fill):
            raise ConfigError(f"AugmentSettings.fill must be three values in 0..255 (RGB), got {self.fill}")


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _canvas_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for inpt in flat_inputs:
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            return tuple(inpt.canvas_size)  # type: ignore[return-value]
        if isinstance(inpt, tv_tensors.Image) or F.is_pure_tensor(inpt):
            return tuple(inpt.shape[-2:])  # type: ignore[return-value]
    raise TypeError("expected an image or bounding boxes in the input")


def _xyxy(boxes: tv_tensors.BoundingBoxes) -> Tensor:
    return F.convert_bounding_box_format(
        boxes.as_subclass(Tensor), boxes.format, tv_tensors.BoundingBoxFormat.XYXY
    )


class PhotometricDistort(v2.Transform):
    """Official colour distortion on uint8 RGB, each step with probability 1/2, in this order.

    Brightness: add U(-32, 32); contrast: multiply by U(0.5, 1.5); then in OpenCV's uint8 HSV, hue
    shifted by an integer in [-18, 18] (wrapping at 180) and saturation multiplied by U(0.5, 1.5).
    Values are clipped and truncated to uint8 after each step (the official code also converts to
    HSV and back when neither colour step runs; that only adds rounding and is skipped here).
    Not `v2.RandomPhotometricDistort`:
    that scales brightness instead of adding to it, blends contrast towards the mean grey instead
    of scaling, may apply contrast after the colour steps, and also permutes the channels.
    """

    _transformed_types = (tv_tensors.Image, F.is_pure_tensor)

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        saturation_range: tuple[float, float] = (0.5, 1.5),
        p: float = 0.5,
    ) -> None:
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.hue_delta = hue_delta
        self.saturation_range = saturation_range
        self.p = p

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        def maybe(draw: Any) -> Any:
            return draw() if float(torch.rand(())) < self.p else None

        return {
            "brightness": maybe(lambda: _uniform(-self.brightness_delta, self.brightness_delta)),
            "contrast": maybe(lambda: _uniform(*self.contrast_range)),
            "hue": maybe(lambda: int(torch.randint(-self.hue_delta, self.hue_delta + 1, ()))),
            "saturation": maybe(lambda: _uniform(*self.saturation_range)),
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        import cv2

        image = inpt.as_subclass(Tensor)
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise TypeError(
                f"{type(self).__name__} expects a uint8 [3, H, W] image, got {image.dtype} {tuple(image.shape)}"
            )
        # Every step maps uint8 values to uint8 values, so each is a 256-entry lookup table.
        levels = np.arange(256, dtype=np.float64)
        table = np.arange(256, dtype=np.uint8)
        if params["brightness"] is not None:
            table = np.clip(levels + params["brightness"], 0, 255).astype(np.uint8)[table]
        if params["contrast"] is not None:
            table = np.clip(levels * params["contrast"], 0, 255).astype(np.uint8)[table]
        rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
        if params["brightness"] is not None or params["contrast"] is not None:
            rgb = cv2.LUT(rgb, table)
        if params["hue"] is not None or params["saturation"] is not None:
            hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # hue in 0..179
            if params["hue"] is not None:
                hsv[..., 0] = cv2.LUT(hsv[..., 0], ((levels + params["hue"]) % 180).astype(np.uint8))
            if params["saturation"] is not None:
                hsv[..., 1] = cv2.LUT(
                    hsv[..., 1], np.clip(levels * params["saturation"], 0, 255).astype(np.uint8)
                )
            rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        out = torch.from_numpy(rgb).permute(2, 0, 1)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


class SSDRandomCrop(v2.RandomIoUCrop):
    """Official SSD crop: a window of area fraction s^2, s ~ U(0.3, 1), aspect jitter in [1/2, 2],
    whose IoU with EVERY box is at least the minimum drawn from `min_ious`; boxes whose centre lies
    inside are kept (clipped), the rest are emptied for `v2.SanitizeBoundingBoxes` to drop.

    Reuses `v2.RandomIoUCrop`'s cropping but not its window search, which draws width and height
    fractions independently, asks the IoU of only one box, and never ends on an image without boxes
    (left uncropped here).
    """

    def __init__(
        self,
        min_ious: Sequence[Optional[float]] = SSD_CROP_MIN_IOUS,
        min_scale: float = 0.3,
        trials: int = 50,
    ) -> None:
        super().__init__(
            min_scale=min_scale, max_scale=1.0, min_aspect_ratio=0.5, max_aspect_ratio=2.0, trials=trials
        )
        if not min_ious:
            raise ValueError("min_ious must hold at least one choice (None keeps the whole image)")
        self.min_ious = tuple(min_ious)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        boxes = next(inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.BoundingBoxes))
        height, width = boxes.canvas_size
        xyxy = _xyxy(boxes).float()
        if xyxy.numel() == 0:
            return {}
        centres = (xyxy[:, :2] + xyxy[:, 2:]) / 2
        while True:
            min_iou = self.min_ious[int(torch.randint(len(self.min_ious), ()))]
            if min_iou is None:
                return {}
            # all trials of this minimum IoU at once; the first valid one is taken
            scale = self.min_scale + (1.0 - self.min_scale) * torch.rand(self.trials, dtype=torch.float64)
            low, high = (scale * scale).clamp(min=0.5), (1.0 / (scale * scale)).clamp(max=2.0)
            ratio = (low + (high - low) * torch.rand(self.trials, dtype=torch.float64)).sqrt()
            crop_w, crop_h = (scale * ratio * width).long(), (scale / ratio * height).long()
            left = (torch.rand(self.trials, dtype=torch.float64) * (width - crop_w)).long()
            top = (torch.rand(self.trials, dtype=torch.float64) * (height - crop_h)).long()
            windows = torch.stack([left, top, left + crop_w, top + crop_h], dim=1).to(xyxy.dtype)
            inside = (centres[:, None] > windows[None, :, :2]).all(-1) & (
                centres[:, None] < windows[None, :, 2:]
            ).all(-1)
            valid = (crop_w > 0) & (crop_h > 0) & (box_iou(xyxy, windows).amin(0) >= min_iou) & inside.any(0)
            if valid.any():
                k = int(valid.nonzero()[0])
                return {
                    "top": int(top[k]),
                    "left": int(left[k]),
                    "height": int(crop_h[k]),
                    "width": int(crop_w[k]),
                    "is_within_crop_area": inside[:, k],
                }


class SSDZoomOut(v2.RandomZoomOut):
    """Official expand: with probability p, place the image on a canvas `scale * r` times as wide
    and `scale / r` times as high (scale ~ U(1, 4), r^2 in [max(1/2, 1/scale^2), min(2, scale^2)])
    filled with the mean colour. `v2.RandomZoomOut` (whose padding this reuses) grows both sides by
    the same factor, without the aspect jitter.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _canvas_size(flat_inputs)
        scale = _uniform(*self.side_range)
        ratio = math.sqrt(_uniform(max(0.5, 1.0 / (scale * scale)), min(2.0, scale * scale)))
        canvas_w, canvas_h = max(width, int(scale * ratio * width)), max(height, int(scale / ratio * height))
        left = int(torch.randint(canvas_w - width + 1, ()))
        top = int(torch.randint(canvas_h - height + 1, ()))
        return {"padding": [left, top, canvas_w - width - left, canvas_h - height - top]}


def _per_box_fields(inputs: Any) -> tuple[Tensor, ...]:
    """What `v2.SanitizeBoundingBoxes` filters with the boxes: the target's labels and crowd flags."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) and len(inputs) > 1 else inputs
    return tuple(target[key] for key in ("labels", "iscrowd") if isinstance(target, dict) and key in target)


def _random_resize(input_size: int) -> v2.Transform:
    return v2.RandomChoice(
        [
            v2.Resize((input_size, input_size), interpolation=mode, antialias=aa)
            for mode, aa in TRAIN_INTERPOLATIONS
        ]
    )


class TrainTransform(torch.nn.Module):
    """The official training augmentation; like the official code, when it leaves no box of an
    image that had some, the sample is instead the image only resized (with all its boxes)."""

    def __init__(self, input_size: int, settings: AugmentSettings = AugmentSettings()) -> None:
        super().__init__()
        if input_size <= 0:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.input_size = input_size
        self.settings = settings
        self.augment = v2.Compose(
            [
                SSDRandomCrop(settings.crop_min_ious, settings.crop_min_scale),
                PhotometricDistort(
                    settings.brightness_delta,
                    settings.contrast_range,
                    settings.hue_delta,
                    settings.saturation_range,
                ),
                SSDZoomOut(
                    fill=settings.fill, side_range=(1.0, settings.max_expand), p=settings.expand_probability
                ),
                v2.RandomHorizontalFlip(settings.flip_probability),
                _random_resize(input_size),
                v2.SanitizeBoundingBoxes(
                    min_size=max(1.0, settings.min_box_fraction * input_size), labels_getter=_per_box_fields
                ),
            ]
        )
        self.fallback = _random_resize(input_size)

    def forward(
        self, image: tv_tensors.Image, target: dict[str, Any]
    ) -> tuple[tv_tensors.Image, dict[str, Any]]:
        out_image, out_target = self.augment(image, target)
        if len(target["boxes"]) and not len(out_target["boxes"]):
            return self.fallback(image, target)
        return out_image, out_target


def build_train_transform(input_size: int, settings: AugmentSettings = AugmentSettings()) -> TrainTransform:
    """Training augmentation to a uint8 [3, S, S] image with boxes in its pixels (official settings by default)."""
    return TrainTransform(input_size, settings)


def build_eval_transform(input_size: int) -> v2.Transform:
    """Evaluation: resize to [3, S, S] only, bilinear without antialiasing as the official test code
    (OpenCV INTER_LINEAR) and `M2Det.preprocess` do; boxes follow, none are dropped."""
    if input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    return v2.Resize((input_size, input_size), interpolation=v2.InterpolationMode.BILINEAR, antialias=False)


# ----- mixing samples: mosaic and mixup (beside the SSD pipeline; see `MosaicMixup`) -----

Sample = tuple[tv_tensors.Image, dict[str, Any]]

# The mosaic centre is drawn in this fraction of the side, so every tile shows at least a quarter
# of its width and height (ultralytics draws it over the whole side and lets slivers happen).
MOSAIC_CENTRE_RANGE: tuple[float, float] = (0.25, 0.75)
# A box cut by the mosaic is kept when at least this fraction of its area stays visible.
MOSAIC_MIN_VISIBLE = 0.25
# Mixup blends with a ratio drawn from Beta(32, 32), about 0.5 (ultralytics' choice).
MIXUP_BETA = 32.0


def mosaic(
    samples: Sequence[Sample],
    centre: tuple[int, int],
    min_visible: float = MOSAIC_MIN_VISIBLE,
    min_size: float = 1.0,
) -> Sample:
    """Four S x S samples as one S x S image split at `centre` (x, y): sample 0 fills the top-left
    part with its bottom-right corner, sample 1 the top-right with its bottom-left, sample 2 the
    bottom-left with its top-right, sample 3 the bottom-right with its top-left (as ultralytics'
    mosaic, without the extra scaling). Each tile's boxes move with it and are clipped to its part;
    a box keeps when at least `min_visible` of its area and `min_size` pixels of width and height
    remain. Labels (and crowd flags, when every sample has them) follow their boxes; the other
    target fields are sample 0's.
    """
    if len(samples) != 4:
        raise ValueError(f"a mosaic takes 4 samples, got {len(samples)}")
    shapes = {tuple(image.shape) for image, _ in samples}
    if len(shapes) != 1 or next(iter(shapes))[1] != next(iter(shapes))[2]:
        raise ValueError(f"a mosaic needs four square images of one size, got {sorted(shapes)}")
    side = next(iter(shapes))[1]
    cx, cy = centre
    if not (0 < cx < side and 0 < cy < side):
        raise ValueError(f"the mosaic centre {centre} must lie inside the {side} x {side} image")
    # per tile: its part of the output (x0, y0, x1, y1) and the shift from tile to output pixels
    parts = [
        ((0, 0, cx, cy), (cx - side, cy - side)),
        ((cx, 0, side, cy), (cx, cy - side)),
        ((0, cy, cx, side), (cx - side, cy)),
        ((cx, cy, side, side), (cx, cy)),
    ]
    out = torch.empty(shapes.pop(), dtype=samples[0][0].dtype)
    boxes, kept = [], []
    for (image, target), ((x0, y0, x1, y1), (dx, dy)) in zip(samples, parts):
        out[:, y0:y1, x0:x1] = image.as_subclass(Tensor)[:, y0 - dy : y1 - dy, x0 - dx : x1 - dx]
        moved = _xyxy(target["boxes"]).float().reshape(-1, 4) + torch.tensor([dx, dy, dx, dy])
        low, high = torch.tensor([x0, y0, x0, y0]), torch.tensor([x1, y1, x1, y1])
        clipped = torch.minimum(torch.maximum(moved, low), high)
        size, whole = clipped[:, 2:] - clipped[:, :2], moved[:, 2:] - moved[:, :2]
        keep = (size >= min_size).all(1) & (size.prod(1) >= min_visible * whole.prod(1))
        boxes.append(clipped[keep])
        kept.append(keep)
    fields = _per_box_keys(samples)
    merged = {
        **samples[0][1],
        "boxes": tv_tensors.BoundingBoxes(torch.cat(boxes), format="XYXY", canvas_size=(side, side)),
        **{key: torch.cat([t[key][k] for (_, t), k in zip(samples, kept)]) for key in fields},
    }
    if "iscrowd" in samples[0][1] and "iscrowd" not in fields:
        del merged["iscrowd"]
    return tv_tensors.Image(out), merged


def mixup(first: Sample, second: Sample, ratio: float) -> Sample:
    """`ratio * first + (1 - ratio) * second`, rounded to uint8, with the boxes of both (as ultralytics'
    mixup: the labels are the union, the loss does not weigh them by the ratio)."""
    (image_a, target_a), (image_b, target_b) = first, second
    if image_a.shape != image_b.shape:
        raise ValueError(
            f"mixup needs images of one size, got {tuple(image_a.shape)} and {tuple(image_b.shape)}"
        )
    blend = ratio * image_a.as_subclass(Tensor).float() + (1.0 - ratio) * image_b.as_subclass(Tensor).float()
    boxes = torch.cat([_xyxy(target_a["boxes"]).reshape(-1, 4), _xyxy(target_b["boxes"]).reshape(-1, 4)])
    merged = {
        **target_a,
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image_a.shape[-2:])),
        **{key: torch.cat([target_a[key], target_b[key]]) for key in _per_box_keys([first, second])},
    }
    if "iscrowd" in target_a and "iscrowd" not in target_b:
        del merged["iscrowd"]
    return tv_tensors.Image(blend.round().clamp(0, 255).to(image_a.dtype)), merged


def _per_box_keys(samples: Sequence[Sample]) -> list[str]:
    """The per-box target fields every sample has: labels, and crowd flags where all have them."""
    return [key for key in ("labels", "iscrowd") if all(key in target for _, target in samples)]


class MosaicMixup(torch.utils.data.Dataset):
    """Training samples of `dataset` (already at the square input, e.g. through `TrainTransform`)
    mixed as ultralytics' pipeline does: with probability `mosaic` a sample is the `mosaic` of it
    and three others drawn at random, then with probability `mixup` it is blended (`mixup`) with
    another such sample. `enabled = False` (close-mosaic, the last epochs) passes samples through.

    Every draw comes from torch's global generator, as the SSD pipeline's, so a seed fixes the
    samples (see `m2det.data.loader`).
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        mosaic: float = 1.0,
        mixup: float = 0.0,
        min_box_fraction: float = 0.01,
    ) -> None:
        for name, value in (("mosaic", mosaic), ("mixup", mixup), ("min_box_fraction", min_box_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MosaicMixup.{name} must be a probability in [0, 1], got {value}")
        self.dataset = dataset
        self.mosaic_probability = float(mosaic)
        self.mixup_probability = float(mixup)
        self.min_box_fraction = float(min_box_fraction)
        self.enabled = True

    @property
    def class_names(self) -> Any:
        return getattr(self.dataset, "class_names", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Sample:
        if not self.enabled:
            return self.dataset[index]
        sample = self._maybe_mosaic(index)
        if self.mixup_probability and float(torch.rand(())) < self.mixup_probability:
            other = self._maybe_mosaic(int(torch.randint(len(self), ())))
            ratio = float(torch.distributions.Beta(MIXUP_BETA, MIXUP_BETA).sample())
            sample = mixup(sample, other, ratio)
        return sample

    def _maybe_mosaic(self, index: int) -> Sample:
        if not (self.mosaic_probability and float(torch.rand(())) < self.mosaic_probability):
            return self.dataset[index]
        others = torch.randint(len(self), (3,)).tolist()
        samples = [self.dataset[i] for i in (index, *others)]
        side = samples[0][0].shape[-1]
        low, high = (int(f * side) for f in MOSAIC_CENTRE_RANGE)
        centre = (int(torch.randint(low, high + 1, ())), int(torch.randint(low, high + 1, ())))
        return mosaic(samples, centre, min_size=max(1.0, self.min_box_fraction * side))
