"""Pascal VOC layout: `Annotations/*.xml`, `JPEGImages/`, `ImageSets/Main/<split>.txt`.

Coordinates in VOC files are 1-based pixel indices; like the official M2Det code we subtract 1
from all four. Difficult objects are flagged `iscrowd` (kept out of training, ignored in scoring).
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from m2det.data.base import (
    BOX_ACTION_DROPPED,
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
    make_record,
    parse_number,
)
from m2det.io.image import IMAGE_SUFFIXES


def is_voc_root(path: PathLike) -> bool:
    path = Path(path)
    return (path / "Annotations").is_dir() and (path / "ImageSets" / "Main").is_dir()


def voc_splits(root: PathLike) -> list[str]:
    """Split names: the files of `ImageSets/Main/` that are not per-class lists (`<class>_<split>.txt`)."""
    names = sorted(p.stem for p in (Path(root) / "ImageSets" / "Main").glob("*.txt"))
    return [n for n in names if not ("_" in n and n.rpartition("_")[2] in names)]


def voc_class_names(root: PathLike) -> tuple[str, ...]:
    """The sorted object names of every annotation file under `root` (all splits agree on them).

    Files that cannot be parsed are skipped here; the split that lists them reports them.
    """
    return object_names(sorted((Path(root).resolve() / "Annotations").glob("*.xml")))


def object_names(xml_files: Sequence[Path]) -> tuple[str, ...]:
    """The sorted `<object><name>`s of VOC XML files; unparsable files are skipped (the data set
    that uses them reports them). Cached on the files and their modification times, so train and
    val of one data set parse them once."""
    return _names_in(tuple((str(path), path.stat().st_mtime_ns) for path in xml_files))


@functools.lru_cache(maxsize=8)
def _names_in(files: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    names: set[str] = set()
    for xml_path, _ in files:
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError:
            continue
        names.update(
            text.strip()
            for text in (obj.findtext("name") for obj in tree.iter("object"))
            if text and text.strip()
        )
    return tuple(sorted(names))


def _text(element: ET.Element, path: str, where: str) -> str:
    text = element.findtext(path)
    if text is None or not text.strip():
        raise MalformedAnnotation(f"missing <{path}> in {where}")
    return text.strip()


def _size_field(annotation: ET.Element, tag: str) -> int:
    text = annotation.findtext(f"size/{tag}")
    return 0 if text is None or not text.strip() else int(parse_number(text, f"<size><{tag}>"))


def _find_image(root: Path, image_id: str, file_name: Optional[str]) -> Optional[Path]:
    candidates = [root / "JPEGImages" / (image_id + ".jpg")]
    if file_name:
        candidates.append(root / "JPEGImages" / file_name)
    candidates += [root / "JPEGImages" / (image_id + suffix) for suffix in IMAGE_SUFFIXES]
    return next((p for p in candidates if p.is_file()), None)


def read_voc_xml(xml_path: Path) -> ET.Element:
    """The root element of an annotation file; `MalformedAnnotation` when it is not XML."""
    try:
        return ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise MalformedAnnotation(f"not valid XML ({exc})") from None


def voc_record(
    annotation: ET.Element,
    xml_path: Path,
    image_path: Path,
    numeric_id: int,
    class_index: dict[str, int],
    report: DataReport,
) -> Record:
    """One parsed annotation file as the record of `image_path`; `MalformedAnnotation` when it
    cannot be used. The size is read from the image when the file leaves it out or at 0."""
    width, height = (_size_field(annotation, tag) for tag in ("width", "height"))
    if width <= 0 or height <= 0:  # some VOC-style exporters leave the size out or at 0
        width, height = image_size(image_path)
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(annotation.iter("object")):
        name = _text(obj, "name", f"<object> {k}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise MalformedAnnotation(f"missing <bndbox> in <object> {k} ({name})")
        coords = [
            parse_number(_text(bndbox, tag, f"<object> {k} ({name})"), f"<object> {k} <{tag}>") - 1.0
            for tag in ("xmin", "ymin", "xmax", "ymax")
        ]
        if name not in class_index:
            report.add(
                xml_path, f"object {k} has class {name!r}, not one of the class names", BOX_ACTION_DROPPED
            )
            continue
        flag = obj.findtext("difficult")
        boxes.append(coords)
        labels.append(class_index[name])
        difficult.append(flag is not None and flag.strip() not in ("", "0"))
    info = ImageInfo(path=image_path, image_id=numeric_id, width=width, height=height)
    return make_record(info, boxes, labels, difficult, xml_path, report)


def class_index_of(names: Sequence[str], where: PathLike) -> dict[str, int]:
    """Class name -> label (1..C); `DatasetError` when there are no names (`where` has no objects)."""
    if not names:
        raise DatasetError(f"{where}: no object names found, so no classes")
    return {name: i + 1 for i, name in enumerate(names)}


class VOCDetection(DetectionDataset):
    """A Pascal VOC style data set: the images listed in `ImageSets/Main/<split>.txt`.

    Class names are the sorted object names found in all annotation files of `root`, unless
    given; objects of other classes are then dropped and reported. Image ids are positions in the
    split file.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "trainval",
        *,
        class_names: Optional[Sequence[str]] = None,
        transforms: Optional[Transform] = None,
        keep_ignored: bool = False,
        strict: bool = False,
    ) -> None:
        root = Path(root)
        if not is_voc_root(root):
            raise DatasetError(
                f"{root}: not a Pascal VOC directory (expected Annotations/ and ImageSets/Main/)"
            )
        split_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(
                f"{split_file}: no such split; splits found: {', '.join(voc_splits(root)) or 'none'}"
            )
        names = list(class_names) if class_names is not None else list(voc_class_names(root))
        class_index = class_index_of(names, root / "Annotations")
        report = DataReport(source=str(split_file), strict=strict)
        image_ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        records = []
        for position, image_id in enumerate(image_ids):
            xml_path = root / "Annotations" / f"{image_id}.xml"
            if not xml_path.is_file():
                report.add(xml_path, "annotation file not found", IMAGE_ACTION_DROPPED)
                continue
            try:
                annotation = read_voc_xml(xml_path)
                image_path = _find_image(root, image_id, annotation.findtext("filename"))
                if image_path is None:
                    raise MalformedAnnotation(
                        f"image not found: no JPEGImages/{image_id}.jpg (or other image suffix)"
                    )
                records.append(voc_record(annotation, xml_path, image_path, position, class_index, report))
            except MalformedAnnotation as exc:
                report.add(xml_path, str(exc), IMAGE_ACTION_DROPPED)
        self.root = root
        self.split = split
        super().__init__(records, names, report, transforms=transforms, keep_ignored=keep_ignored)
