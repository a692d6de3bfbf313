"""`build_dataset`: pick the format from the source (COCO json, Pascal VOC folder, YOLO data YAML, or a
folder of images with VOC XML files beside them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from m2det.data.base import DatasetError, DetectionDataset, PathLike, Transform
from m2det.data.coco import CocoDetection
from m2det.data.folder import NotAnImageFolder, VOCImageFolder
from m2det.data.voc import VOCDetection, is_voc_root
from m2det.data.yolo import YOLODetection

FORMATS_HELP = (
    "a COCO instances .json, a Pascal VOC folder (with Annotations/ and ImageSets/Main/), a YOLO "
    "data .yaml, or a folder of images with VOC XML files beside them (LabelImg)"
)


def build_dataset(
    source: PathLike,
    split: str = "train",
    *,
    strict: bool = False,
    transforms: Optional[Transform] = None,
    keep_ignored: bool = False,
    image_dir: Optional[PathLike] = None,
    **kwargs: Any,
) -> DetectionDataset:
    """The data set at `source`; `split` names the VOC ImageSets file, the YOLO entry or the image
    folder's subfolder (a COCO json is one split). `image_dir` is for COCO (found beside the json
    when omitted); other keyword arguments go to the format's class (e.g. VOC `class_names`)."""
    path = Path(source)
    common: dict[str, Any] = {
        "strict": strict,
        "transforms": transforms,
        "keep_ignored": keep_ignored,
        **kwargs,
    }
    if not path.exists():
        raise DatasetError(f"{path}: not found (expected {FORMATS_HELP})")
    if image_dir is not None and path.suffix.lower() != ".json":
        raise DatasetError(f"image_dir is only for COCO json sources, not {path}")
    if path.is_file() and path.suffix.lower() == ".json":
        return CocoDetection(path, image_dir, **common)
    if path.is_file() and path.suffix.lower() in (".yaml", ".yml"):
        return YOLODetection(path, split, **common)
    if path.is_dir() and is_voc_root(path):
        return VOCDetection(path, split, **common)
    if path.is_dir():
        try:
            return VOCImageFolder(path, split, **common)
        except NotAnImageFolder as exc:
            raise DatasetError(f"{exc}{_other_format_hint(path)}") from None
    raise DatasetError(f"{path}: not a data set m2det can read (expected {FORMATS_HELP})")


def _other_format_hint(folder: Path) -> str:
    """Why a folder that fails as an image folder is no data set, naming a COCO json or YOLO YAML in
    it that may be the one meant."""
    found = sorted(
        p for pattern in ("*.json", "*.yaml", "*.yml", "annotations/*.json") for p in folder.glob(pattern)
    )
    if not found:
        return f"; not a data set m2det can read (expected {FORMATS_HELP})"
    named = " or ".join(str(p) for p in found[:3])
    return (
        f"; not a data set m2det can read as a folder of images (give {named} itself if that is the data set)"
    )
