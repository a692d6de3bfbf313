"""A folder of images with Pascal VOC XML files beside them, as LabelImg writes it (and CVAT's or
Roboflow's Pascal VOC export): no `Annotations/`, `JPEGImages/` or `ImageSets/Main` lists needed.

The split names a subfolder (of `images/` when there is one, else of the folder itself):

    photos/images/train/a.jpg a.xml ...     photos/train/a.jpg a.xml ...     photos/a.jpg a.xml ...
    photos/images/val/...                   photos/valid/...                 (flat: one split, train)
    photos/images/test/...                  photos/test/...

Each image is paired with the XML of the same name, beside it or in a parallel folder: the last
`images` (or `JPEGImages`) folder of its path replaced by `labels`, `annotations` or `Annotations`
(`photos/annotations/train/a.xml`). The XMLs are read by the VOC parser (`m2det.data.voc`).

- `val` also finds a `valid/` or `validation/` folder. Without one it is the `test` folder, and
  without that too a fixed tenth of `train`, held out (`train` is then the rest): see
  `held_out`. Each fallback is said in a log line. A flat folder is the split `train`, so the
  same hold-out gives it a `val`. Any other missing split is an error naming those that exist.
- An image without an XML is an image with no objects (LabelImg writes no file for an image left
  without boxes); their number is said in a log line. An XML without an image is reported.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from m2det.config import close_matches
from m2det.data.base import (
    ANNOTATION_ACTION_IGNORED,
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
)
from m2det.data.voc import class_index_of, object_names, read_voc_xml, voc_record
from m2det.io.image import IMAGE_SUFFIXES

IMAGE_FOLDERS = ("images", "JPEGImages")
XML_FOLDERS = ("labels", "annotations", "Annotations")
VAL_NAMES = ("val", "valid", "validation")
HOLD_OUT_FRACTION = 0.1


class NotAnImageFolder(DatasetError):
    """The folder holds no images, or no image with an XML: probably a data set of another format."""


@dataclass(frozen=True)
class FolderLayout:
    """The split folders of an image folder: name -> folder. A flat folder has the one split
    `train`, its `base` itself."""

    root: Path
    base: Path  # root/images (or root/JPEGImages) when there is one, else root
    splits: dict[str, Path]
    flat: bool

    def find(self, split: str) -> Optional[str]:
        """The split folder's name for `split`: the same name (any case), for `val` also `valid`
        or `validation`; None when there is none."""
        wanted = VAL_NAMES if split.lower() in VAL_NAMES else (split.lower(),)
        by_lower = {name.lower(): name for name in self.splits}
        return next((by_lower[name] for name in wanted if name in by_lower), None)

    def described(self) -> str:
        if self.flat:
            return f"{self.base} is a flat folder of images: one split, train (and val, held out of it)"
        return f"splits found in {self.base}: {', '.join(self.splits)}"


def images_in(folder: Path, recursive: bool) -> list[Path]:
    """The image files in `folder` (and its subfolders when `recursive`), sorted."""
    found = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def find_layout(root: Path) -> FolderLayout:
    """The split folders under `root`: the subfolders of `images/` (or of `root`) that hold images,
    or `root` (its `images/`) as one flat split; `DatasetError` when there are no images."""
    base = next((root / name for name in IMAGE_FOLDERS if (root / name).is_dir()), root)
    splits = {d.name: d for d in sorted(base.iterdir()) if d.is_dir() and images_in(d, recursive=True)}
    loose = images_in(base, recursive=False)
    if splits and loose:
        raise DatasetError(
            f"{base}: {len(loose)} image(s) ({loose[0].name}, ...) lie beside the split folders "
            f"{', '.join(splits)}; move them into one (or use a folder with no subfolders: one split)"
        )
    if splits:
        return FolderLayout(root, base, splits, flat=False)
    if not loose:
        raise NotAnImageFolder(f"{root}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return FolderLayout(root, base, {"train": base}, flat=True)


def xml_candidates(image: Path, root: Path) -> list[Path]:
    """Where an image's XML may be: beside it, then in each parallel folder below `root`."""
    parallel = (parallel_path(image, IMAGE_FOLDERS, name, ".xml", root) for name in XML_FOLDERS)
    return [image.with_suffix(".xml"), *(p for p in parallel if p is not None)]


def xml_files_of(layout: FolderLayout, folder: Path) -> list[Path]:
    """The XML files of a split folder: in it and in its parallel folders (subfolders included,
    except for a flat folder)."""
    parallel = (parallel_path(folder, IMAGE_FOLDERS, name, root=layout.root) for name in XML_FOLDERS)
    folders = [f for f in (folder, *parallel) if f is not None and f.is_dir()]
    return sorted({x for f in folders for x in (f.glob("*.xml") if layout.flat else f.rglob("*.xml"))})


def held_out(images: Sequence[Path], folder: Path) -> set[Path]:
    """The images of `train` that stand in for a missing `val` (and `test`): the tenth (at least one)
    whose path within `folder` has the lowest CRC-32. The same images on every run and machine,
    and adding images moves few of them between the two."""
    if len(images) < 2:
        raise DatasetError(
            f"{folder}: {len(images)} image(s) in train are too few to hold some out for val; "
            "add a val folder (or more images)"
        )
    count = max(1, round(len(images) * HOLD_OUT_FRACTION))
    ranked = sorted(images, key=lambda p: (zlib.crc32(p.relative_to(folder).as_posix().encode()), p))
    return set(ranked[:count])


@dataclass(frozen=True)
class SplitImages:
    """The images `split` stands for: their split folder, what they are (for the data report), and
    a note to log when they are not simply that folder's images."""

    images: list[Path]
    folder: Path
    what: str
    note: Optional[str] = None


def split_images(layout: FolderLayout, split: str) -> SplitImages:
    """The images of `split`, by the rules of the module; `DatasetError` naming the splits found."""
    name = layout.find(split)
    if name is not None:
        folder = layout.splits[name]
        images = images_in(folder, recursive=not layout.flat)
        if split.lower() != "train" or layout.find("val") or layout.find("test"):
            return SplitImages(images, folder, name)
        kept = [p for p in images if p not in held_out(images, folder)]
        note = (
            f"{layout.root}: no val or test folder, so {len(images) - len(kept)} of the {len(images)} "
            f"images of {name} are held out as val (the same ones every run); training on the other "
            f"{len(kept)}"
        )
        return SplitImages(kept, folder, f"{name}, less the val hold-out", note)
    if split.lower() in VAL_NAMES:
        test, train = layout.find("test"), layout.find("train")
        if test is not None:
            folder = layout.splits[test]
            note = f"{layout.root}: no val folder: validating on {test} ({folder})"
            return SplitImages(images_in(folder, recursive=True), folder, f"{test}, as val", note)
        if train is not None:
            folder = layout.splits[train]
            images = images_in(folder, recursive=not layout.flat)
            kept = sorted(held_out(images, folder))
            note = (
                f"{layout.root}: no val or test folder: validating on the {len(kept)} of the "
                f"{len(images)} images of {train} held out of training (the same ones every run)"
            )
            return SplitImages(kept, folder, f"val, held out of {train}", note)
    close = close_matches(split, list(layout.splits))
    guess = f"did you mean {' or '.join(close)}? " if close and not layout.flat else ""
    raise DatasetError(
        f"{layout.root}: no {split!r} split; {guess}{layout.described()} "
        "(val falls back to test, then to a hold-out of train: see docs/data.md)"
    )


def _no_xml_error(images: Sequence[Path], folder: Path, root: Path) -> NotAnImageFolder:
    """The error for a split none of whose images has an XML: where one was looked for."""
    example = images[0]
    looked = ", ".join(str(p) for p in xml_candidates(example, root))
    yolo = parallel_path(example, ("images",), "labels", ".txt", root)
    hint = ""
    if yolo is not None and yolo.is_file():
        hint = f"; {yolo} looks like a YOLO label file: give the YOLO data .yaml instead"
    return NotAnImageFolder(
        f"{folder}: no VOC XML file for any of its {len(images)} image(s) (for {example.name} "
        f"looked for {looked}){hint}"
    )


class VOCImageFolder(DetectionDataset):
    """Images with VOC XML files beside them (LabelImg's layout); see the module for the rules.

    Class names are the sorted object names of every XML file of every split, unless given
    (objects of other classes are then dropped and reported). Image ids are positions in the
    split's sorted list of images.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        *,
        class_names: Optional[Sequence[str]] = None,
        transforms: Optional[Transform] = None,
        keep_ignored: bool = False,
        strict: bool = False,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: not a folder of images")
        layout = find_layout(root)
        chosen = split_images(layout, split)
        images, folder = chosen.images, chosen.folder
        # every image of the folder claims its XML, held-out ones too: what is left has no image
        xml_of = {
            image: next((c for c in xml_candidates(image, root) if c.is_file()), None)
            for image in images_in(folder, recursive=not layout.flat)
        }
        if not any(xml_of.values()):
            raise _no_xml_error(list(xml_of), folder, root)
        if class_names is None:
            every_xml = {x for f in layout.splits.values() for x in xml_files_of(layout, f)}
            class_names = object_names(sorted(every_xml))
        names = list(class_names)
        class_index = class_index_of(names, layout.base)
        report = DataReport(source=f"{folder} [{chosen.what}]", strict=strict)
        if chosen.note is not None:
            logger.warning(chosen.note)
        records: list[Record] = []
        without_xml: list[Path] = []
        for image_id, image in enumerate(images):
            xml_path = xml_of[image]
            try:
                if xml_path is None:
                    without_xml.append(image)
                    width, height = image_size(image)
                    info = ImageInfo(path=image, image_id=image_id, width=width, height=height)
                    records.append(make_record(info, [], [], [], image, report))
                else:
                    annotation = read_voc_xml(xml_path)
                    records.append(voc_record(annotation, xml_path, image, image_id, class_index, report))
            except MalformedAnnotation as exc:
                report.add(xml_path or image, str(exc), IMAGE_ACTION_DROPPED)
        if without_xml:
            logger.warning(
                "%s: %d of the %d images have no XML file, used as images with no objects (e.g. %s)",
                report.source, len(without_xml), len(images), without_xml[0].name,
            )  # fmt: skip
        claimed = set(xml_of.values())
        for xml_path in xml_files_of(layout, folder):
            if xml_path not in claimed:
                problem = f"no image named {xml_path.stem} for it (an image and its XML share their name)"
                report.add(xml_path, problem, ANNOTATION_ACTION_IGNORED)
        self.root = root
        self.split = split
        self.layout = layout
        super().__init__(records, names, report, transforms=transforms, keep_ignored=keep_ignored)
