"""What `m2det detect` reads: an image, a folder, a glob, a video file or a camera index.

Image files are read with `m2det.io.image.read_image` (the rule every part of m2det decodes by);
videos and cameras are read with `cv2.VideoCapture`, frames as OpenCV arrays (BGR, HWC, uint8).
Files that are not images or videos are listed as unsupported with the reason, for the caller to
report and skip.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np

from m2det.errors import FileFormatError
from m2det.io.image import IMAGE_SUFFIXES

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})


@dataclass(frozen=True)
class SourceItem:
    """One input: `kind` is "image", "video", "camera" or "unsupported" (then `reason` says why)."""

    kind: str
    path: str  # a file path, or the camera index as text
    reason: str = ""

    @property
    def name(self) -> str:
        return f"camera{self.path}" if self.kind == "camera" else Path(self.path).name


def classify(path: Union[str, Path]) -> SourceItem:
    """An image, a video or an unsupported file, by its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return SourceItem("image", str(path))
    if suffix in VIDEO_SUFFIXES:
        return SourceItem("video", str(path))
    return SourceItem("unsupported", str(path), f"unsupported file type {suffix or '(no suffix)'!r}")


LIST_SUFFIX = ".txt"


def resolve_source(source: Union[str, Path]) -> list[SourceItem]:
    """The inputs `source` names: a file, the files of a folder (sorted, not recursive, hidden ones
    left out), the files a glob matches, the files a list file (`.txt`) names, or a camera when
    `source` is a number that is not a file."""
    text = str(source)
    path = Path(text)
    if text.isdigit() and not path.exists():
        return [SourceItem("camera", text)]
    if path.is_dir():
        return [classify(p) for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if path.is_file() and path.suffix.lower() == LIST_SUFFIX:
        return read_list_file(path)
    if path.is_file():
        return [classify(path)]
    if glob.has_magic(text):
        matches = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
        files = [p for p in matches if p.is_file()]
        if not files:
            raise FileNotFoundError(f"no files match {text!r}")
        return [classify(p) for p in files]
    raise FileNotFoundError(
        f"source not found: {text} (expected an image, a folder, a glob, a video or a camera index)"
    )


def read_list_file(path: Path) -> list[SourceItem]:
    """The inputs a list file names, one path a line in its order (blank lines and lines starting
    with # left out; relative paths are relative to the list file's folder). A named file that does
    not exist is listed as unsupported, to be reported and skipped like an unreadable one."""
    from m2det.io.atomic import errors_name

    with errors_name(path):
        lines = path.read_text(encoding="utf-8").splitlines()
    items = []
    for line in lines:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        target = Path(name) if Path(name).is_absolute() else path.parent / name
        items.append(
            classify(target) if target.is_file() else SourceItem("unsupported", str(target), "not found")
        )
    return items


class VideoReader:
    """Frames of a video file or a camera (BGR HWC uint8), with its frame rate and size."""

    def __init__(self, item: SourceItem):
        self.item = item
        target: Union[int, str] = int(item.path) if item.kind == "camera" else item.path
        self.capture = cv2.VideoCapture(target)
        what = f"camera {item.path}" if item.kind == "camera" else item.path
        if not self.capture.isOpened():
            raise FileFormatError(f"{what}: cannot be opened as a video")
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and fps > 0 else 25.0
        count = int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT))
        self.frame_count: Optional[int] = count if count > 0 and item.kind == "video" else None

    def frames(self, max_frames: Optional[int] = None) -> Iterator[np.ndarray]:
        read = 0
        while max_frames is None or read < max_frames:
            ok, frame = self.capture.read()
            if not ok:
                return
            read += 1
            yield frame

    def close(self) -> None:
        self.capture.release()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
