"""COCO layout: one instances json and a folder of images.

Class names are the json's categories in id order; labels are their positions + 1 and
`category_ids[label - 1]` gives the json's id back. Crowd annotations are flagged `iscrowd`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from m2det.data.base import (
    ANNOTATION_ACTION_IGNORED,
    IMAGE_ACTION_DROPPED,
    DataReport,
    DatasetError,
    DetectionDataset,
    ImageInfo,
    MalformedAnnotation,
    PathLike,
    Transform,
    make_record,
    parse_number,
)
from m2det.io.jsonfile import read_json


def image_dir_candidates(annotation_file: Path) -> list[Path]:
    """Usual image folders for a json: `annotations/instances_X.json` -> `X/`, `images/X/`, `images/`, ..."""
    split = annotation_file.stem.split("_", 1)[1] if "_" in annotation_file.stem else annotation_file.stem
    here, parent = annotation_file.parent, annotation_file.parent.parent
    return [here / "images", here / split, parent / split, parent / "images" / split, parent / "images", here]


def find_image_dir(annotation_file: Path, first_file_name: Optional[str]) -> Path:
    """The first usual image folder that holds the json's first image (or that exists, if none)."""
    candidates = image_dir_candidates(annotation_file)
    for directory in candidates:
        if directory.is_dir() and (first_file_name is None or (directory / first_file_name).is_file()):
            return directory
    tried = ", ".join(str(c) for c in candidates)
    raise DatasetError(
        f"{annotation_file}: cannot find the image folder (looked for {first_file_name!r} in {tried}); "
        "pass image_dir"
    )


def load_coco_json(path: Path) -> dict[str, Any]:
    """The json as a dict with `images`, `annotations` and `categories` lists, or a `DatasetError`."""
    data = read_json(path, "annotation file", error=DatasetError)
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a COCO object with 'images' and 'categories', got {type(data).__name__}"
        )
    data.setdefault("annotations", [])
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: field {key!r} must be a list")
    return data


def _categories(data: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    categories = []
    for k, category in enumerate(data["categories"]):
        if (
            not isinstance(category, dict)
            or not isinstance(category.get("id"), int)
            or not isinstance(category.get("name"), str)
        ):
            raise DatasetError(
                f"{path}: categories[{k}] needs an integer 'id' and a string 'name', got {category!r}"
            )
        categories.append(category)
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: duplicate category ids in 'categories'")
    if not categories:
        raise DatasetError(f"{path}: 'categories' is empty, so there are no classes")
    return sorted(categories, key=lambda c: c["id"])


def _image_entry(image: Any, k: int) -> tuple[int, str, int, int]:
    if not isinstance(image, dict):
        raise MalformedAnnotation(f"images[{k}] is not an object")
    image_id, file_name = image.get("id"), image.get("file_name")
    if not isinstance(image_id, int) or not isinstance(file_name, str):
        raise MalformedAnnotation(f"images[{k}] needs an integer 'id' and a string 'file_name'")
    width = int(parse_number(image.get("width"), f"images[{k}].width"))
    height = int(parse_number(image.get("height"), f"images[{k}].height"))
    if width <= 0 or height <= 0:
        raise MalformedAnnotation(f"images[{k}] has size {width}x{height}")
    return image_id, file_name, width, height


def _box(annotation: dict[str, Any], category_label: dict[int, int]) -> tuple[list[float], int, bool, float]:
    ann_id = annotation.get("id", "?")
    bbox = annotation.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise MalformedAnnotation(f"annotation {ann_id}: 'bbox' must be [x, y, width, height], got {bbox!r}")
    x, y, w, h = (parse_number(v, f"annotation {ann_id} bbox") for v in bbox)
    category = annotation.get("category_id")
    if category not in category_label:
        raise MalformedAnnotation(f"annotation {ann_id}: category_id {category!r} is not in 'categories'")
    area = annotation.get("area")
    area = parse_number(area, f"annotation {ann_id} area") if area is not None else w * h
    return [x, y, x + w, y + h], category_label[category], bool(annotation.get("iscrowd", 0)), area


class CocoDetection(DetectionDataset):
    """A COCO instances json and its image folder (found beside the json when not given)."""

    def __init__(
        self,
        annotation_file: PathLike,
        image_dir: Optional[PathLike] = None,
        *,
        transforms: Optional[Transform] = None,
        keep_ignored: bool = False,
        strict: bool = False,
    ) -> None:
        path = Path(annotation_file)
        data = load_coco_json(path)
        categories = _categories(data, path)
        category_label = {c["id"]: i + 1 for i, c in enumerate(categories)}
        report = DataReport(source=str(path), strict=strict)

        images: dict[int, tuple[str, int, int]] = {}
        for k, image in enumerate(data["images"]):
            try:
                image_id, file_name, width, height = _image_entry(image, k)
            except MalformedAnnotation as exc:
                report.add(path, str(exc), IMAGE_ACTION_DROPPED)
                continue
            if image_id in images:
                report.add(path, f"images[{k}] repeats image id {image_id}", IMAGE_ACTION_DROPPED)
                continue
            images[image_id] = (file_name, width, height)
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for k, annotation in enumerate(data["annotations"]):
            if not isinstance(annotation, dict) or annotation.get("image_id") not in images:
                referred = annotation.get("image_id") if isinstance(annotation, dict) else None
                report.add(
                    path,
                    f"annotations[{k}] refers to image id {referred!r}, not in 'images'",
                    ANNOTATION_ACTION_IGNORED,
                )
                continue
            by_image[annotation["image_id"]].append(annotation)
        if image_dir is None:
            image_dir = find_image_dir(path, next((file_name for file_name, _, _ in images.values()), None))
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise DatasetError(f"{image_dir}: image folder not found (for {path})")

        records = []
        for image_id, (file_name, width, height) in images.items():
            where = f"{path} (image {file_name}, id {image_id})"
            image_path = image_dir / file_name
            if not image_path.is_file():
                report.add(where, f"image file not found: {image_path}", IMAGE_ACTION_DROPPED)
                continue
            try:
                boxes = [_box(a, category_label) for a in by_image.get(image_id, [])]
            except MalformedAnnotation as exc:
                report.add(where, str(exc), IMAGE_ACTION_DROPPED)
                continue
            info = ImageInfo(path=image_path, image_id=image_id, width=width, height=height)
            coords, labels, crowd, areas = zip(*boxes) if boxes else ((), (), (), ())
            records.append(make_record(info, coords, labels, crowd, where, report, areas=areas))

        self.annotation_file = path
        self.image_dir = image_dir
        self.category_ids = [c["id"] for c in categories]
        super().__init__(
            records, [c["name"] for c in categories], report, transforms=transforms, keep_ignored=keep_ignored
        )
