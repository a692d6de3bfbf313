"""YOLO layout: a data YAML (`path`, `train`, `val`, `names`) and one label txt per image.

A label line is `class x_center y_center width height` normalised to [0, 1] (or a polygon
`class x1 y1 x2 y2 ...`, whose enclosing box is used); class ids count from 0, so label = id + 1.
An image's label file is found by replacing the last `images` folder of its path with `labels`
and the suffix with `.txt`; an image without a label file has no objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from m2det.data.base import (
    IMAGE_ACTION_DROPPED,
    DataReport,
    DatasetError,
    DetectionDataset,
    ImageInfo,
    MalformedAnnotation,
    PathLike,
    Record,
    Transform,
    image_size,
    logger,
    make_record,
    parallel_path,
    parse_number,
)
from m2det.io.image import IMAGE_SUFFIXES


def load_data_yaml(path: Path) -> dict[str, Any]:
    """The data YAML as a dict, with `names` turned into a list, or a `DatasetError`."""
    import yaml

    if not path.is_file():
        raise DatasetError(f"{path}: data YAML not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with 'train', 'val' and 'names'")
    names = data.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DatasetError(
                f"{path}: 'names' keys must be the class ids 0..{len(names) - 1}, got {sorted(names)}"
            )
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: 'names' must be a non-empty list or an id -> name mapping")
    if "nc" in data and data["nc"] != len(names):
        raise DatasetError(f"{path}: 'nc' is {data['nc']} but 'names' has {len(names)} entries")
    return {**data, "names": [str(n) for n in names]}


def _images_of(entry: Path, where: Path) -> list[Path]:
    """The images of one `train`/`val` entry: a folder (searched recursively) or a txt list."""
    if entry.is_dir():
        return sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if entry.is_file() and entry.suffix == ".txt":
        lines = (line.strip() for line in entry.read_text().splitlines())
        return [
            (entry.parent / line).resolve() if not Path(line).is_absolute() else Path(line)
            for line in lines
            if line
        ]
    raise DatasetError(f"{where}: {entry} is neither an image folder nor a .txt list of images")


def label_path(image_path: Path) -> Path:
    """`.../images/.../name.jpg` -> `.../labels/.../name.txt` (the last `images` folder; beside the
    image when its path has none)."""
    return parallel_path(image_path, ("images",), "labels", ".txt") or image_path.with_suffix(".txt")


def parse_label_line(line: str, lineno: int, num_classes: int) -> tuple[int, list[float]]:
    """One label line as (class id, [cx, cy, w, h] normalised)."""
    parts = line.split()
    if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
        raise MalformedAnnotation(
            f"line {lineno}: expected 'class x_center y_center width height' (or a polygon), got {line.strip()!r}"
        )
    class_value = parse_number(parts[0], f"line {lineno} class")
    if class_value != int(class_value) or not 0 <= class_value < num_classes:
        raise MalformedAnnotation(f"line {lineno}: class {parts[0]!r} is not an id in 0..{num_classes - 1}")
    values = [parse_number(v, f"line {lineno} coordinate") for v in parts[1:]]
    if len(values) == 4:
        return int(class_value), values
    xs, ys = values[0::2], values[1::2]
    x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    return int(class_value), [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def read_labels(
    image_path: Path, label_file: Path, image_id: int, num_classes: int, report: DataReport
) -> Record:
    width, height = image_size(image_path)
    boxes, labels = [], []
    if label_file.is_file():
        for lineno, line in enumerate(label_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            class_id, (cx, cy, w, h) = parse_label_line(line, lineno, num_classes)
            boxes.append(
                [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
            )
            labels.append(class_id + 1)
    info = ImageInfo(path=image_path, image_id=image_id, width=width, height=height)
    return make_record(info, boxes, labels, [False] * len(labels), label_file, report)


class YOLODetection(DetectionDataset):
    """A YOLO data set: the `split` entry (`train`, `val` or `test`) of a data YAML."""

    def __init__(
        self,
        data_yaml: PathLike,
        split: str = "train",
        *,
        transforms: Optional[Transform] = None,
        keep_ignored: bool = False,
        strict: bool = False,
    ) -> None:
        yaml_path = Path(data_yaml)
        data = load_data_yaml(yaml_path)
        root = yaml_path.parent / str(data.get("path") or "")
        if data.get(split) is None:
            available = [k for k in ("train", "val", "test") if data.get(k) is not None]
            raise DatasetError(
                f"{yaml_path}: no {split!r} entry; entries found: {', '.join(available) or 'none'}"
            )
        entries = data[split] if isinstance(data[split], list) else [data[split]]
        images = [p for entry in entries for p in _images_of(root / str(entry), yaml_path)]
        if not images:
            raise DatasetError(
                f"{yaml_path}: no images found for {split!r} ({', '.join(str(root / str(e)) for e in entries)})"
            )

        names: list[str] = data["names"]
        report = DataReport(source=f"{yaml_path} [{split}]", strict=strict)
        records, unlabeled = [], 0
        for image_id, image_path in enumerate(images):
            label_file = label_path(image_path)
            if not image_path.is_file():
                report.add(image_path, "image not found", IMAGE_ACTION_DROPPED)
                continue
            unlabeled += not label_file.is_file()
            try:
                records.append(read_labels(image_path, label_file, image_id, len(names), report))
            except MalformedAnnotation as exc:
                report.add(label_file, str(exc), IMAGE_ACTION_DROPPED)
        if unlabeled == len(images):
            raise DatasetError(
                f"{yaml_path}: no label file for any {split!r} image (e.g. expected {label_path(images[0])})"
            )
        if unlabeled:
            logger.info(
                "%s: %d image(s) without a label file, used as images with no objects",
                report.source,
                unlabeled,
            )
        self.data_yaml = yaml_path
        self.split = split
        super().__init__(
            records, names, report, transforms=transforms, keep_ignored=keep_ignored, sizes_from_headers=True
        )
