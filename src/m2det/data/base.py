"""What every data set format shares: per-image records, box checks, a report of dropped data, loading.

A format module (COCO, VOC, YOLO) only parses its files into `Record`s and reports problems to a
`DataReport`; `DetectionDataset` does the rest (decoding, targets, transforms, COCO ground truth).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from m2det.errors import M2DetError
from m2det.io.image import ImageReadError, exif_orientation, read_image
from m2det.io.image import image_size as read_image_size

logger = logging.getLogger("m2det.data")

PathLike = Union[str, Path]
Sample = tuple[tv_tensors.Image, dict[str, Any]]
Transform = Callable[[tv_tensors.Image, dict[str, Any]], Sample]

# A box further outside its image than this (in pixels) is reported when clipped; closer is rounding.
OUTSIDE_TOLERANCE = 1.0

IMAGE_ACTION_DROPPED = "image dropped"
BOX_ACTION_DROPPED = "box dropped"
BOX_ACTION_CLIPPED = "box clipped"
ANNOTATION_ACTION_IGNORED = "annotation ignored"


class DatasetError(M2DetError):
    """A data problem that stops the run: strict mode, an unreadable annotation file, no usable image."""


class MalformedAnnotation(ValueError):
    """Raised by a format parser for one image whose annotation cannot be used; the image is dropped."""


@dataclass(frozen=True)
class ImageInfo:
    """Where an image is and its size in the file (the pixels its boxes are given in)."""

    path: Path
    image_id: int
    width: int
    height: int


@dataclass
class Record:
    """One image's annotation: boxes xyxy in the file's pixels, labels 1..C-1, crowd/difficult flags.

    `areas` holds the annotation's own area (COCO's segmentation area) where the format has one.
    """

    info: ImageInfo
    boxes: np.ndarray  # float32 [K, 4]
    labels: np.ndarray  # int64 [K]
    iscrowd: np.ndarray  # bool [K]
    areas: Optional[np.ndarray] = None  # float32 [K]


@dataclass(frozen=True)
class Issue:
    """One problem found in the data: the file, what is wrong, what was done about it."""

    where: str
    problem: str
    action: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem} ({self.action})"


@dataclass
class DataReport:
    """Problems met while reading a data set; strict mode turns the first one into a `DatasetError`."""

    source: str
    strict: bool = False
    issues: list[Issue] = field(default_factory=list)

    def add(self, where: PathLike, problem: str, action: str) -> None:
        if self.strict:
            raise DatasetError(f"{where}: {problem} (strict mode: fix the data or drop --strict)")
        self.issues.append(Issue(str(where), problem, action))

    def count(self, action: str) -> int:
        return sum(issue.action == action for issue in self.issues)

    @property
    def dropped_images(self) -> int:
        return self.count(IMAGE_ACTION_DROPPED)

    @property
    def dropped_boxes(self) -> int:
        return self.count(BOX_ACTION_DROPPED)

    @property
    def clipped_boxes(self) -> int:
        return self.count(BOX_ACTION_CLIPPED)

    def summary(self, limit: int = 10) -> str:
        """Counts per action, then the first `limit` problems one per line."""
        if not self.issues:
            return f"{self.source}: no problems found"
        counts = Counter(issue.action for issue in self.issues)
        totals = ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
        lines = [f"{self.source}: {len(self.issues)} problem(s) in the data: {totals}"]
        lines += [f"  {issue}" for issue in self.issues[:limit]]
        if len(self.issues) > limit:
            lines.append(f"  ... and {len(self.issues) - limit} more (see dataset.report.issues)")
        return "\n".join(lines)

    def log(self) -> None:
        """Log the summary once, as a warning, when anything was found."""
        if self.issues:
            logger.warning(self.summary())


def check_boxes(
    boxes: np.ndarray, width: int, height: int, where: PathLike, report: DataReport
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image and find the ones to keep: `(clipped boxes, keep mask)`.

    A box outside the image by more than `OUTSIDE_TOLERANCE` pixels is clipped and reported; a box
    of zero or negative size (after clipping) is dropped and reported.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    limits = np.array([width, height, width, height], dtype=np.float64)
    clipped = np.clip(boxes, 0.0, limits)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    outside = np.abs(clipped - boxes).max(axis=1, initial=0.0) > OUTSIDE_TOLERANCE
    for i in np.flatnonzero(~keep | outside):
        coords = "[" + ", ".join(f"{v:g}" for v in boxes[i]) + "]"
        size = boxes[i, 2] - boxes[i, 0], boxes[i, 3] - boxes[i, 1]
        if not keep[i] and min(size) <= 0:
            report.add(
                where,
                f"box {i} {coords} has zero or negative size {size[0]:g}x{size[1]:g}",
                BOX_ACTION_DROPPED,
            )
        elif not keep[i]:
            report.add(where, f"box {i} {coords} lies outside the {width}x{height} image", BOX_ACTION_DROPPED)
        else:
            report.add(
                where, f"box {i} {coords} extends outside the {width}x{height} image", BOX_ACTION_CLIPPED
            )
    return clipped.astype(np.float32), keep


def make_record(
    info: ImageInfo,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    iscrowd: Sequence[bool],
    where: PathLike,
    report: DataReport,
    areas: Optional[Sequence[float]] = None,
) -> Record:
    """A record with its boxes checked against the image size (see `check_boxes`)."""
    clipped, keep = check_boxes(np.asarray(boxes, dtype=np.float64), info.width, info.height, where, report)
    return Record(
        info=info,
        boxes=clipped[keep].reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64).reshape(-1)[keep],
        iscrowd=np.asarray(iscrowd, dtype=bool).reshape(-1)[keep],
        areas=None if areas is None else np.asarray(areas, dtype=np.float32).reshape(-1)[keep],
    )


def parse_number(value: Any, what: str) -> float:
    """A finite float from a text or JSON field, or `MalformedAnnotation` naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MalformedAnnotation(f"{what} is {value!r}, expected a number") from None
    if not np.isfinite(number):
        raise MalformedAnnotation(f"{what} is {value!r}, expected a finite number")
    return number


def image_size(path: PathLike) -> tuple[int, int]:
    """(width, height) of the image upright (see `m2det.io.image`), from its header; an unreadable
    file is a `MalformedAnnotation` (its image is dropped)."""
    try:
        return read_image_size(path)
    except ImageReadError as exc:
        raise MalformedAnnotation(f"image {exc.source}: {exc.problem}") from None


def parallel_path(
    path: Path,
    folders: Sequence[str],
    replacement: str,
    suffix: Optional[str] = None,
    root: Optional[Path] = None,
) -> Optional[Path]:
    """`path` with its last folder named one of `folders` (below `root`, when given) replaced by
    `replacement`, and its suffix by `suffix` when given: `.../images/train/a.jpg` ->
    `.../labels/train/a.txt`. None when the path has no such folder."""
    parts = list(path.parts)
    first = len(root.parts) if root is not None else 0
    for i in range(len(parts) - 1, first - 1, -1):
        if parts[i] in folders:
            parts[i] = replacement
            parallel = Path(*parts)
            return parallel.with_suffix(suffix) if suffix is not None else parallel
    return None


def size_problem(info: ImageInfo, width: int, height: int) -> Optional[str]:
    """What is wrong when the image is `width` x `height` (upright) but its annotation says otherwise
    (None when they agree), with the EXIF orientation named when it explains swapped sides."""
    if (width, height) == (info.width, info.height):
        return None
    problem = f"image is {width}x{height} but its annotation says {info.width}x{info.height}"
    if (height, width) == (info.width, info.height):
        orientation = exif_orientation(info.path)
        if orientation in (5, 6, 7, 8):
            problem += (
                f" (its EXIF orientation {orientation} turns it upright: give sizes and boxes for the "
                "upright image, as phones and labelling tools show it)"
            )
    return problem


def check_image_headers(records: list[Record], report: DataReport) -> list[Record]:
    """The records whose image file opens as an image of the size its annotation says, from the
    file's header (tens of microseconds an image); the others are reported and dropped.

    Run when a data set is built, so that an unreadable or mislabelled file is named before
    training starts, not when an epoch reaches it. Data cut short after a good header (a truncated
    copy) is only found when the pixels are decoded, in `DetectionDataset.load_image`.
    """
    kept = []
    for record in records:
        try:
            width, height = read_image_size(record.info.path)
        except ImageReadError as exc:
            report.add(exc.source, exc.problem, IMAGE_ACTION_DROPPED)
            continue
        problem = size_problem(record.info, width, height)
        if problem is not None:
            report.add(record.info.path, problem, IMAGE_ACTION_DROPPED)
            continue
        kept.append(record)
    return kept


class DetectionDataset(Dataset):
    """Images with boxes, as `(image, target)` samples in the torchvision detection convention.

    image: `tv_tensors.Image` uint8 [3, H, W] RGB. target: `boxes` (`tv_tensors.BoundingBoxes`
    float32 [K, 4] XYXY pixels), `labels` int64 [K] in 1..C-1, `iscrowd` bool [K], `image_id`,
    `orig_size` tensor [2] (H, W) of the file's image. `transforms(image, target)` is applied last.
    Crowd (COCO) and difficult (VOC) boxes are removed unless `keep_ignored=True` (evaluation).
    Every image's header is checked first (`check_image_headers`) unless the format read the
    sizes from the headers itself (`sizes_from_headers`, YOLO).
    """

    def __init__(
        self,
        records: list[Record],
        class_names: Sequence[str],
        report: DataReport,
        *,
        transforms: Optional[Transform] = None,
        keep_ignored: bool = False,
        sizes_from_headers: bool = False,
    ) -> None:
        if not sizes_from_headers:
            records = check_image_headers(records, report)
        if not records:
            raise DatasetError(
                f"{report.source}: no usable images" + (f"\n{report.summary()}" if report.issues else "")
            )
        self.records = records
        self.class_names = list(class_names)
        self.report = report
        self.transforms = transforms
        self.keep_ignored = keep_ignored
        self._coco_gt: Any = None
        self._unusable: set[int] = set()  # indices found unusable when loading (in this process)
        report.log()

    @property
    def num_classes(self) -> int:
        """Classes including background (label 0)."""
        return len(self.class_names) + 1

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        boxes = sum(len(r.labels) for r in self.records)
        return (
            f"{type(self).__name__}({self.report.source!r}: {len(self)} images, {boxes} boxes, "
            f"{len(self.class_names)} classes, {len(self.report.issues)} problems)"
        )

    def image_info(self, index: int) -> ImageInfo:
        return self.records[index].info

    def box_counts(self) -> dict[str, int]:
        """Number of boxes per class name (ignored boxes included)."""
        counts = Counter(int(label) for r in self.records for label in r.labels)
        return {name: counts.get(i + 1, 0) for i, name in enumerate(self.class_names)}

    def load_image(self, index: int) -> tv_tensors.Image:
        """The decoded image (upright, RGB: the rule of `m2det.io.image`), checked to be the size its
        annotation was given for; `ImageReadError` naming the file when it is not usable."""
        info = self.records[index].info
        image = read_image(info.path)
        problem = size_problem(info, image.shape[-1], image.shape[-2])
        if problem is not None:
            raise ImageReadError(info.path, problem)
        return tv_tensors.Image(image)

    def target(self, index: int) -> dict[str, Any]:
        """The untransformed target in the file's pixels (ignored boxes removed unless `keep_ignored`)."""
        record = self.records[index]
        keep = slice(None) if self.keep_ignored else ~record.iscrowd
        size = (record.info.height, record.info.width)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(record.boxes[keep]).reshape(-1, 4), format="XYXY", canvas_size=size
            ),
            "labels": torch.from_numpy(record.labels[keep]),
            "iscrowd": torch.from_numpy(record.iscrowd[keep]),
            "image_id": record.info.image_id,
            "orig_size": torch.tensor(size, dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        # An image that turns out unusable only now (files are not decoded up front) is reported,
        # dropped and replaced by the next one, so one bad file does not end a training run.
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._unusable:
                continue
            try:
                image = self.load_image(candidate)
                break
            except ImageReadError as exc:
                self._drop_unusable(candidate, exc)
        else:
            raise DatasetError(f"{self.report.source}: none of the images can be read")
        target = self.target(candidate)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _drop_unusable(self, index: int, exc: ImageReadError) -> None:
        """Report an image found unusable when loading (strict: `DatasetError`) and skip it from now on.

        With DataLoader workers each worker finds and reports it in its own copy of the data set.
        """
        self.report.add(exc.source, exc.problem, IMAGE_ACTION_DROPPED)
        self._unusable.add(index)
        logger.warning("%s (%s); using the next image instead", exc, IMAGE_ACTION_DROPPED)

    def coco_gt(self) -> Any:
        """The ground truth as a pycocotools `COCO`, in the original pixels (built once).

        Category ids are our labels (1..C-1); crowd and difficult boxes have `iscrowd=1`; `area` is
        the annotation's own area when the format has one, else the box area.
        """
        if self._coco_gt is None:
            from pycocotools.coco import COCO

            images: list[dict[str, Any]] = []
            annotations: list[dict[str, Any]] = []
            for record in self.records:
                info = record.info
                images.append(
                    {
                        "id": info.image_id,
                        "file_name": str(info.path),
                        "width": info.width,
                        "height": info.height,
                    }
                )
                widths = record.boxes[:, 2] - record.boxes[:, 0]
                heights = record.boxes[:, 3] - record.boxes[:, 1]
                areas = record.areas if record.areas is not None else widths * heights
                for k in range(len(record.labels)):
                    annotations.append(
                        {
                            "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                            "image_id": info.image_id,
                            "category_id": int(record.labels[k]),
                            "bbox": [
                                float(record.boxes[k, 0]),
                                float(record.boxes[k, 1]),
                                float(widths[k]),
                                float(heights[k]),
                            ],
                            "area": float(areas[k]),
                            "iscrowd": int(record.iscrowd[k]),
                        }
                    )
            categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.class_names)]
            coco = COCO()
            coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
            with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
                coco.createIndex()
            self._coco_gt = coco
        return self._coco_gt
