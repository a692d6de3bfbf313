"""A generated data set of coloured shapes in COCO format: the package's built-in default to train on.

Each class is an outline (circle, square, triangle, ...) drawn in a random colour, so only the shape
tells the class. Objects range from tiny to large, later shapes may partly hide earlier ones (the
annotation is the box of what stays visible), distractors that belong to no class clutter the
scene, and backgrounds vary. Everything follows from the configuration: the same `ShapesConfig`
always writes the same bytes, and a directory that already holds that generation is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import cv2
import numpy as np

from m2det.errors import ConfigError, M2DetError

# Bump when the drawing changes, so that earlier generations on disk are not reused.
GENERATOR_VERSION = 1
MARKER_FILE = "generation.json"
SPLITS = ("train", "val")
BACKGROUNDS = ("flat", "gradient", "noise", "texture")


def _regular_polygon(corners: int, start: float = math.pi / 2) -> np.ndarray:
    angles = start + 2 * math.pi * np.arange(corners) / corners
    return np.stack([np.cos(angles), -np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular_polygon(2 * points)
    outer[1::2] *= inner
    return outer


def _cross(arm: float = 0.3) -> np.ndarray:
    """A plus sign whose arms are `2 * arm` wide, scaled so that its corners touch the unit circle."""
    a = arm
    quarter = [[a, -1], [a, -a], [1, -a]]  # one arm's right edge and the next arm's top edge
    corners = []
    for turn in range(4):  # rotate the quarter by 90 degrees four times
        for x, y in quarter:
            for _ in range(turn):
                x, y = -y, x
            corners.append([x, y])
    return np.array(corners, dtype=np.float64) / math.hypot(1, a)


# Outlines inscribed in the unit circle (x right, y down); an object's size is that circle's diameter.
SHAPES: dict[str, np.ndarray] = {
    "circle": _regular_polygon(64),
    "square": _regular_polygon(4, math.pi / 4),
    "triangle": _regular_polygon(3),
    "star": _star(),
    "cross": _cross(),
    "hexagon": _regular_polygon(6),
}


@dataclass(frozen=True)
class ShapesConfig:
    """The knobs of the generated data set; each changes what its name says.

    * `objects_per_image` (min, max): how many objects are attempted per image; an object for which
      no placement satisfies `occlusion`/`min_visible` is skipped, so an image may hold fewer.
    * `size_range` (min, max): object size (the diameter of its circumscribed circle) as a fraction
      of the shorter image side, drawn log-uniformly so that small objects are as common as large.
    * `occlusion`: the chance that an object is placed over an earlier one; otherwise it is placed
      clear of every earlier object's box (by at least 2 pixels). 0 means no object ever overlaps another.
    * `min_visible`: an object may hide at most 1 - this fraction of an earlier one; objects left
      less visible than this (by clutter drawn in front) are not annotated.
    * `clutter`: up to this many distractors per image (lines and curves, some in front of the
      objects, and irregular blobs behind them); 0 for none.
    * `backgrounds`: the styles to draw backgrounds from (see `BACKGROUNDS`).
    """

    width: int = 320
    height: int = 320
    classes: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
    objects_per_image: tuple[int, int] = (1, 6)
    size_range: tuple[float, float] = (0.06, 0.5)
    occlusion: float = 0.25
    min_visible: float = 0.5
    clutter: int = 3
    backgrounds: tuple[str, ...] = BACKGROUNDS
    image_format: str = "jpg"  # jpg | png
    jpeg_quality: int = 90
    seed: int = 0

    def __post_init__(self) -> None:
        # lists from YAML or the command line become tuples, so the config stays hashable and frozen
        for name in ("classes", "objects_per_image", "size_range", "backgrounds"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, Sequence):
                raise ConfigError(f"{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the field when a value cannot work."""
        if self.width < 32 or self.height < 32:
            raise ConfigError(f"width and height must be >= 32 pixels, got {self.width}x{self.height}")
        unknown = [c for c in self.classes if c not in SHAPES]
        if not self.classes or unknown or len(set(self.classes)) != len(self.classes):
            raise ConfigError(
                f"classes must be distinct names from {sorted(SHAPES)}, got {list(self.classes)}"
            )
        low, high = _pair(self.objects_per_image, "objects_per_image")
        if not 0 <= low <= high:
            raise ConfigError(
                f"objects_per_image must be (min, max) with 0 <= min <= max, got {self.objects_per_image}"
            )
        small, large = _pair(self.size_range, "size_range")
        if not 0 < small <= large <= 1 or small * min(self.width, self.height) < 4:
            raise ConfigError(
                f"size_range must be (min, max) fractions with 0 < min <= max <= 1 and min at least 4 pixels, "
                f"got {self.size_range} for {self.width}x{self.height}"
            )
        if not 0 <= self.occlusion <= 1:
            raise ConfigError(f"occlusion must be a probability in [0, 1], got {self.occlusion}")
        if not 0 < self.min_visible <= 1:
            raise ConfigError(f"min_visible must be in (0, 1], got {self.min_visible}")
        if self.clutter < 0:
            raise ConfigError(f"clutter must be >= 0, got {self.clutter}")
        unknown = [b for b in self.backgrounds if b not in BACKGROUNDS]
        if not self.backgrounds or unknown:
            raise ConfigError(
                f"backgrounds must be names from {list(BACKGROUNDS)}, got {list(self.backgrounds)}"
            )
        if self.image_format not in ("jpg", "png"):
            raise ConfigError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _pair(value: Sequence[Any], name: str) -> tuple[Any, Any]:
    if len(value) != 2:
        raise ConfigError(f"{name} must be a (min, max) pair, got {list(value)}")
    return value[0], value[1]


# ----- drawing one image -----


@dataclass
class ShapeObject:
    """One drawn object. `box` is (x_min, y_min, x_max, y_max), inclusive, of its visible pixels."""

    label: int  # 1..K, the index into `ShapesConfig.classes` plus one
    color: tuple[int, int, int]  # RGB
    full_area: int  # pixels when drawn
    visible_area: int = 0  # pixels still its own in the finished image
    box: Optional[tuple[int, int, int, int]] = None
    annotated: bool = True


@dataclass
class ShapesSample:
    """A rendered image (RGB uint8 [H, W, 3]), who owns each pixel (index into `objects`, -1 for
    background and clutter), and every object drawn, annotated or not."""

    image: np.ndarray
    owner: np.ndarray
    objects: list[ShapeObject] = field(default_factory=list)

    @property
    def annotations(self) -> list[ShapeObject]:
        return [obj for obj in self.objects if obj.annotated]


@dataclass
class _Placed:
    """A rasterised candidate: the mask over its bounding rectangle, which starts at (x0, y0)."""

    x0: int
    y0: int
    mask: np.ndarray  # bool [h, w]

    @property
    def region(self) -> tuple[slice, slice]:
        h, w = self.mask.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)


def render_sample(config: ShapesConfig, split: str, index: int) -> ShapesSample:
    """Image `index` of `split`, drawn from its own seed (independent of how many images a split has)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
    h, w = config.height, config.width
    image = _background(rng, rng.choice(config.backgrounds), h, w)
    owner = np.full((h, w), -1, dtype=np.int16)

    distractors = [_distractor(rng, h, w) for _ in range(rng.integers(0, config.clutter + 1))]
    in_front = [(mask, color) for mask, color, front in distractors if front]
    for mask, color, front in distractors:
        if not front:
            image[mask] = color

    sample = ShapesSample(image, owner)
    boxes: list[tuple[int, int, int, int]] = []  # drawn rectangles (x0, y0, x1, y1) exclusive end
    low, high = config.objects_per_image
    for _ in range(rng.integers(low, high + 1)):
        _add_object(rng, config, sample, boxes)

    for mask, color in in_front:
        image[mask] = color
        owner[mask] = -1
    _finish_annotations(sample, config.min_visible)
    return sample


def _add_object(
    rng: np.random.Generator,
    config: ShapesConfig,
    sample: ShapesSample,
    boxes: list[tuple[int, int, int, int]],
) -> None:
    """Try a few placements; draw the first that respects `occlusion` and `min_visible`, or skip."""
    h, w = sample.owner.shape
    label = int(rng.integers(len(config.classes))) + 1
    outline = SHAPES[config.classes[label - 1]]
    small, large = config.size_range
    # at most the shorter side minus a margin, so that any rotation fits inside the image
    diameter = min(min(h, w) * math.exp(rng.uniform(math.log(small), math.log(large))), min(h, w) - 2)
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = outline @ rotation.T * (diameter / 2)
    low, high = points.min(axis=0), points.max(axis=0)  # extent around the centre
    overlap = bool(boxes) and rng.random() < config.occlusion

    for _ in range(30):
        if overlap:
            x0, y0, x1, y1 = boxes[rng.integers(len(boxes))]
            direction = rng.uniform(0, 2 * math.pi)
            reach = rng.uniform(0.3, 0.9) * ((x1 - x0 + y1 - y0) / 4 + diameter / 2)
            center = np.array(
                [(x0 + x1) / 2 + reach * math.cos(direction), (y0 + y1) / 2 + reach * math.sin(direction)]
            )
        else:
            center = rng.uniform(0, 1, 2) * np.array([w, h])
        center = np.clip(center, -low, np.array([w - 1, h - 1]) - high)
        placed = _rasterise(points + center)
        if placed is None or (not overlap and _touches(placed, boxes)):
            continue
        lost = _pixels_lost(sample, placed)
        if _hides_too_much(sample, lost, config.min_visible):
            continue
        _draw(rng, sample, placed, lost, label)
        mh, mw = placed.mask.shape
        boxes.append((placed.x0, placed.y0, placed.x0 + mw, placed.y0 + mh))
        return


def _rasterise(polygon: np.ndarray) -> Optional[_Placed]:
    shift = 4  # sub-pixel vertex precision for fillPoly
    x0, y0 = np.floor(polygon.min(axis=0)).astype(int)
    x1, y1 = np.floor(polygon.max(axis=0)).astype(int) + 1
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=np.uint8)
    fixed = np.round((polygon - [x0, y0]) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(mask, [fixed], 1, lineType=cv2.LINE_8, shift=shift)
    ys, xs = np.nonzero(mask)
    if len(ys) < 6:
        return None
    mask = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(bool)
    return _Placed(int(x0 + xs.min()), int(y0 + ys.min()), mask)


def _touches(placed: _Placed, boxes: list[tuple[int, int, int, int]], margin: int = 2) -> bool:
    h, w = placed.mask.shape
    x0, y0, x1, y1 = placed.x0 - margin, placed.y0 - margin, placed.x0 + w + margin, placed.y0 + h + margin
    return any(x0 < bx1 and bx0 < x1 and y0 < by1 and by0 < y1 for bx0, by0, bx1, by1 in boxes)


def _pixels_lost(sample: ShapesSample, placed: _Placed) -> np.ndarray:
    """How many of each drawn object's visible pixels the placement would cover."""
    covered = sample.owner[placed.region][placed.mask]
    return np.bincount(covered[covered >= 0], minlength=len(sample.objects))


def _hides_too_much(sample: ShapesSample, lost: np.ndarray, min_visible: float) -> bool:
    return any(
        obj.visible_area - lost[k] < min_visible * obj.full_area
        for k, obj in enumerate(sample.objects)
        if lost[k]
    )


def _draw(
    rng: np.random.Generator, sample: ShapesSample, placed: _Placed, lost: np.ndarray, label: int
) -> None:
    region = placed.region
    under = sample.image[region][placed.mask]
    under = under[:: max(1, len(under) // 256)].astype(np.int32)  # a sample of what it covers is enough
    candidates = rng.integers(0, 256, (12, 3))
    # the colour that stands out best from what it covers (the 5th percentile of L1 distances)
    distance = np.abs(under[None, :, :] - candidates[:, None, :]).sum(axis=2)
    color = candidates[int(np.argmax(np.percentile(distance, 5, axis=1)))]
    for obj, count in zip(sample.objects, lost.tolist()):
        obj.visible_area -= count
    sample.image[region][placed.mask] = color
    sample.owner[region][placed.mask] = len(sample.objects)
    area = int(placed.mask.sum())
    sample.objects.append(ShapeObject(label, (int(color[0]), int(color[1]), int(color[2])), area, area))


def _finish_annotations(sample: ShapesSample, min_visible: float) -> None:
    """Boxes and areas of what stays visible; objects left below `min_visible` are not annotated."""
    ys, xs = np.nonzero(sample.owner >= 0)
    ids = sample.owner[ys, xs]
    count = len(sample.objects)
    visible = np.bincount(ids, minlength=count)
    big = np.iinfo(np.int32).max
    x_min = np.full(count, big)
    y_min = np.full(count, big)
    x_max = np.full(count, -1)
    y_max = np.full(count, -1)
    np.minimum.at(x_min, ids, xs)
    np.minimum.at(y_min, ids, ys)
    np.maximum.at(x_max, ids, xs)
    np.maximum.at(y_max, ids, ys)
    for k, obj in enumerate(sample.objects):
        obj.visible_area = int(visible[k])
        obj.annotated = obj.visible_area >= min_visible * obj.full_area
        if obj.visible_area:
            obj.box = (int(x_min[k]), int(y_min[k]), int(x_max[k]), int(y_max[k]))


# ----- backgrounds and clutter -----


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates as [h, 1] and [1, w], to broadcast against each other."""
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def _background(rng: np.random.Generator, style: str, h: int, w: int) -> np.ndarray:
    if style == "flat":
        out = np.broadcast_to(_random_color(rng), (h, w, 3))
    elif style == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = _grid(h, w)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[:, :, None]
        out = (1 - t) * _random_color(rng) + t * _random_color(rng)
    elif style == "noise":
        sigma = rng.uniform(8, 40)
        out = _random_color(rng) + sigma * rng.standard_normal((h, w, 3), dtype=np.float32)
        if rng.random() < 0.5:
            out = cv2.GaussianBlur(out, (3, 3), 0)
    elif style == "texture":
        out = _texture(rng, h, w)
    else:  # validated by ShapesConfig
        raise ValueError(f"unknown background style {style!r}")
    return np.clip(out, 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    if rng.random() < 0.5:  # soft patches of colour
        cells = int(rng.integers(3, 12))
        grid = _random_color(rng) + rng.uniform(-70, 70, (cells, cells, 3)).astype(np.float32)
        return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    # stripes or checks between two colours
    period = rng.uniform(6, 40)
    angle = rng.uniform(0, math.pi)
    ys, xs = _grid(h, w)
    wave = np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
    if rng.random() < 0.5:
        wave = wave * np.sin(2 * math.pi * (-xs * math.sin(angle) + ys * math.cos(angle)) / period)
    t = (0.5 + 0.5 * np.tanh(3 * wave))[:, :, None]
    return (1 - t) * _random_color(rng) + t * _random_color(rng)


def _distractor(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """A mask, an RGB colour and whether it goes in front of the objects: a line, a curve or a blob."""
    mask = np.zeros((h, w), dtype=np.uint8)
    kind = rng.choice(("line", "curve", "blob"))
    color = rng.integers(0, 256, 3).astype(np.uint8)
    if kind == "line":
        p1, p2 = (tuple(int(v) for v in rng.uniform(0, 1, 2) * (w, h)) for _ in range(2))
        cv2.line(mask, p1, p2, 1, thickness=int(rng.integers(1, 4)))
    elif kind == "curve":
        steps = rng.normal(0, 0.08, (int(rng.integers(4, 9)), 2)) * (w, h)
        points = np.cumsum(steps, axis=0) + rng.uniform(0, 1, 2) * (w, h)
        cv2.polylines(mask, [points.astype(np.int32)], False, 1, thickness=int(rng.integers(1, 4)))
    else:  # an irregular blob: thresholded smooth noise in a random rectangle
        bw, bh = (int(rng.uniform(0.08, 0.35) * s) + 2 for s in (w, h))
        noise = cv2.resize(
            rng.uniform(0, 1, (5, 5)).astype(np.float32), (bw, bh), interpolation=cv2.INTER_CUBIC
        )
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        mask[y0 : y0 + bh, x0 : x0 + bw] = noise > 0.6
    front = kind != "blob" and rng.random() < 0.3
    return mask.astype(bool), color, front


# ----- writing a data set -----


@dataclass(frozen=True)
class ShapesSplit:
    """One written split: its COCO json, its image folder and how many images it holds."""

    annotations: Path
    images: Path
    num_images: int


@dataclass(frozen=True)
class GeneratedShapes:
    """Where a generation lives; `reused` is True when an identical one was already on disk."""

    root: Path
    train: ShapesSplit
    val: ShapesSplit
    class_names: tuple[str, ...]
    reused: bool


def generation_hash(config: ShapesConfig, num_train: int, num_val: int) -> str:
    """Identifies a generation: the generator version, every knob and the split sizes."""
    key = {
        "version": GENERATOR_VERSION,
        "config": config.to_dict(),
        "num_train": num_train,
        "num_val": num_val,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def generate_shapes_dataset(
    out_dir: Union[str, Path],
    num_train: int = 800,
    num_val: int = 200,
    config: Optional[ShapesConfig] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> GeneratedShapes:
    """Write `out_dir/{train,val}/images/*` and `out_dir/{train,val}/annotations.json` (COCO).

    The whole directory appears at once (built beside it, then renamed). When `out_dir` already
    holds the same generation (same config, sizes and generator version) nothing is redone; an
    earlier, different generation there is replaced; any other non-empty directory is an error.
    `progress(done, total)` is called after each image.
    """
    config = config or ShapesConfig()
    if num_train < 0 or num_val < 0 or num_train + num_val < 1:
        raise M2DetError(
            f"num_train and num_val must be >= 0 with at least one image, got {num_train}, {num_val}"
        )
    out_dir = Path(out_dir)
    digest = generation_hash(config, num_train, num_val)
    result = _layout(out_dir, config, num_train, num_val)
    if _holds_generation(out_dir, digest):
        return dataclasses.replace(result, reused=True)
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER_FILE).is_file())
    ):
        raise M2DetError(
            f"{out_dir}: exists and is not a generated shapes data set; choose a new or empty directory"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        counter = _Progress(num_train + num_val, progress)
        for split, count in (("train", num_train), ("val", num_val)):
            _write_split(staging / split, config, split, count, counter)
        marker = {"hash": digest, "version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val}
        (staging / MARKER_FILE).write_text(json.dumps({**marker, "config": config.to_dict()}, indent=1))
        _swap_in(staging, out_dir, digest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return result


def _layout(out_dir: Path, config: ShapesConfig, num_train: int, num_val: int) -> GeneratedShapes:
    def split(name: str, count: int) -> ShapesSplit:
        return ShapesSplit(out_dir / name / "annotations.json", out_dir / name / "images", count)

    return GeneratedShapes(
        out_dir, split("train", num_train), split("val", num_val), config.classes, reused=False
    )


def _holds_generation(out_dir: Path, digest: str) -> bool:
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    complete = all((out_dir / split / "annotations.json").is_file() for split in SPLITS)
    return isinstance(marker, dict) and marker.get("hash") == digest and complete


def _swap_in(staging: Path, out_dir: Path, digest: str) -> None:
    """Rename the finished staging directory to `out_dir`, moving an earlier generation out of the way."""
    retired = None
    if out_dir.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, retired / out_dir.name)
    try:
        os.rename(staging, out_dir)
    except OSError:
        if not _holds_generation(out_dir, digest):  # else a concurrent run just wrote the same thing
            raise
    finally:
        if retired is not None:
            shutil.rmtree(retired)


@dataclass
class _Progress:
    total: int
    report: Optional[Callable[[int, int], None]]
    done: int = 0

    def step(self) -> None:
        self.done += 1
        if self.report is not None:
            self.report(self.done, self.total)


def _write_split(split_dir: Path, config: ShapesConfig, split: str, count: int, progress: _Progress) -> None:
    image_dir = split_dir / "images"
    image_dir.mkdir(parents=True)
    if config.image_format == "jpg":
        extension, params = ".jpg", [cv2.IMWRITE_JPEG_QUALITY, config.jpeg_quality]
    else:
        extension, params = ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        sample = render_sample(config, split, index)
        file_name = f"{index:06d}{extension}"
        ok, encoded = cv2.imencode(extension, cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {image_dir / file_name}")
        (image_dir / file_name).write_bytes(encoded.tobytes())
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "width": config.width, "height": config.height}
        )
        for obj in sample.annotations:
            assert obj.box is not None  # annotated objects are visible (min_visible > 0), so boxed
            x0, y0, x1, y1 = obj.box  # inclusive pixel indices; COCO boxes cover whole pixels
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj.label,
                    "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
                    "area": float(obj.visible_area),
                    "iscrowd": 0,
                }
            )
        progress.step()
    coco = {
        "info": {"description": "m2det generated shapes", "version": str(GENERATOR_VERSION), "split": split},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(config.classes)
        ],
    }
    (split_dir / "annotations.json").write_text(json.dumps(coco))
