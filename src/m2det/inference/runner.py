"""`DetectRun`: detections for a list of inputs (images, videos, cameras) written to a folder.

What `m2det detect` runs: annotated images and videos, `detections.json` (per image: file, frame,
size, boxes with names) and `results_coco.json` (COCO results format). Each image's detections are
appended to `detections.jsonl` as soon as they are found, so a run stopped by a crash or a full
disk keeps what it did; the two JSON files are built from it at the end.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from m2det.errors import M2DetError

DETECTIONS_JSON = "detections.json"
DETECTIONS_JSONL = "detections.jsonl"
COCO_RESULTS_JSON = "results_coco.json"


def coco_category_ids(class_names: list[str]) -> list[int]:
    """COCO category id of each label (index label - 1): COCO's own ids for a COCO model, else the label."""
    from m2det.classes import COCO_CATEGORY_IDS, COCO_CLASSES

    if tuple(class_names) == COCO_CLASSES:
        return list(COCO_CATEGORY_IDS)
    return list(range(1, len(class_names) + 1))


@dataclass
class DetectRun:
    """One detection run over `m2det.inference.sources` items: reads the inputs in batches, detects
    with `detector` (a `Detector`), draws, and records the results (each image's at once, as a line
    of `detections.jsonl`; `write_json` builds the final files)."""

    detector: Any
    out_dir: Path
    save: bool = True
    max_frames: Optional[int] = None
    progress: bool = True
    skipped: list[dict] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    num_records: int = 0  # images and video frames recorded
    num_detections: int = 0
    num_images: int = 0
    num_frames: int = 0
    num_videos: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        from m2det.io.jsonfile import JsonLinesWriter

        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._names: set[str] = set()
        self._categories = coco_category_ids(self.detector.class_names)
        self._records = JsonLinesWriter(self.out_dir / DETECTIONS_JSONL)

    def __enter__(self) -> DetectRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close `detections.jsonl` (what it holds stays: one line per image recorded)."""
        self._records.close()

    # ----- the loop -----
    def process(self, items: list) -> None:
        from m2det.io.image import read_image
        from m2det.progress import progress_bar

        start = time.perf_counter()
        num_files = sum(item.kind == "image" for item in items)
        with progress_bar(total=num_files, unit="img", desc="detect", enabled=self.progress) as bar:
            self._bar = bar
            pending: list[tuple[str, Any]] = []
            for item in items:
                if item.kind == "unsupported":
                    self._skip(item.path, item.reason)
                elif item.kind == "image":
                    try:
                        pending.append((item.path, read_image(item.path)))
                    except (ValueError, OSError) as exc:
                        self._skip(item.path, str(exc).replace(f"{item.path}: ", ""))
                        bar.update(1)
                    if len(pending) == self.detector.batch_size:
                        self._images(pending)
                        pending = []
                else:
                    self._images(pending)
                    pending = []
                    self._video(item)
            self._images(pending)
        self.seconds = time.perf_counter() - start

    def _images(self, batch: list[tuple[str, Any]]) -> None:
        if not batch:
            return
        rgb = self._rgb([image for _, image in batch])
        results = self.detector.detect(rgb)
        for (path, _), image, result in zip(batch, rgb, results):
            self._record(path, None, image, result)
            if self.save:
                self._write_image(path, self._draw(image, result))
            self.num_images += 1
        self._bar.update(len(batch))

    def _video(self, item: Any) -> None:
        from m2det.inference.sources import VideoReader

        try:
            reader = VideoReader(item)
        except ValueError as exc:
            self._skip(item.path, str(exc).split(": ", 1)[-1])
            return
        expected = reader.frame_count
        if self.max_frames is not None:
            expected = min(expected or self.max_frames, self.max_frames)
        self._bar.total = (self._bar.total or 0) + (expected or 0)
        self._bar.refresh()
        target = self._output_path(Path(item.name).stem + ".mp4")
        partial = target.with_name(f".{target.stem}.partial.mp4")  # the writer needs the real suffix
        writer = None
        frames = 0
        try:
            with reader:
                batch: list[Any] = []
                for frame in reader.frames(self.max_frames):
                    batch.append(frame)
                    if len(batch) == self.detector.batch_size:
                        writer = self._frames(item, batch, frames, writer, partial, reader.fps)
                        frames += len(batch)
                        batch = []
                if batch:
                    writer = self._frames(item, batch, frames, writer, partial, reader.fps)
                    frames += len(batch)
        finally:
            if writer is not None:
                writer.release()
                os.replace(partial, target)
                self.outputs.append(target)
        if frames == 0:
            self._skip(item.path, "no frame could be read")
            return
        self.num_videos += 1

    def _frames(self, item: Any, batch: list[Any], first: int, writer: Any, path: Path, fps: float) -> Any:
        import cv2

        rgb = self._rgb(batch)
        results = self.detector.detect(rgb)
        for offset, (frame, result) in enumerate(zip(rgb, results)):
            self._record(item.path if item.kind == "video" else item.name, first + offset, frame, result)
            if self.save:
                if writer is None:
                    height, width = frame.shape[-2:]
                    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
                    if not writer.isOpened():
                        raise M2DetError(f"{path}: OpenCV cannot write mp4v video here; use --no-save")
                writer.write(self._draw(frame, result))
        self.num_frames += len(batch)
        self._bar.update(len(batch))
        return writer

    # ----- results -----
    @staticmethod
    def _rgb(images: list[Any]) -> list[Any]:
        """Images (RGB CHW already) and video frames (OpenCV's BGR HWC) as the RGB CHW tensors that
        both detection and drawing take."""
        from m2det.inference.detector import to_rgb_tensor

        return [to_rgb_tensor(image) for image in images]

    def _record(self, path: str, frame: Optional[int], image: Any, result: dict) -> None:
        """Append the image's detections to `detections.jsonl`, flushed at once."""
        from m2det.inference.results import detection_records

        height, width = (int(v) for v in image.shape[-2:])
        detections = detection_records(result)
        self._records.write(
            {
                "id": self.num_records + 1,
                "file": str(path),
                "frame": frame,
                "width": width,
                "height": height,
                "detections": detections,
            }
        )
        self.num_records += 1
        self.num_detections += len(detections)

    def _draw(self, rgb: Any, result: dict) -> Any:
        """The detections drawn on an RGB CHW image, as an OpenCV (BGR HWC) array to encode."""
        import numpy as np

        from m2det.visualize import draw_detections

        drawn = draw_detections(
            rgb, result["boxes"], result["labels"], result["scores"], self.detector.class_names
        )
        return np.ascontiguousarray(drawn.permute(1, 2, 0).numpy()[..., ::-1])

    def _write_image(self, source: str, bgr: Any) -> None:
        import cv2

        from m2det.io.atomic import atomic_path

        target = self._output_path(Path(source).name)
        ok, encoded = cv2.imencode(target.suffix, bgr)
        if not ok:
            target = self._output_path(Path(source).stem + ".jpg")
            ok, encoded = cv2.imencode(".jpg", bgr)
        with atomic_path(target) as tmp:
            tmp.write_bytes(encoded.tobytes())
        self.outputs.append(target)

    def _output_path(self, name: str) -> Path:
        """`name` in the output folder, made unique when two inputs share a file name."""
        stem, suffix = Path(name).stem, Path(name).suffix
        candidate, number = name, 1
        while candidate in self._names:
            candidate = f"{stem}_{number}{suffix}"
            number += 1
        self._names.add(candidate)
        return self.out_dir / candidate

    def _skip(self, path: str, reason: str) -> None:
        self.skipped.append({"file": str(path), "reason": reason})
        self._bar.write(f"skipped {path}: {reason}")

    def write_json(self, source: str) -> None:
        """`detections.json` and `results_coco.json` from the records of `detections.jsonl`, each
        written atomically."""
        import dataclasses

        from m2det.inference.results import coco_result
        from m2det.io.jsonfile import read_json_lines, write_json

        self.close()
        images = read_json_lines(self.out_dir / DETECTIONS_JSONL)
        coco = [
            coco_result(d["box"], d["score"], d["label"], image["id"], self._categories)
            for image in images
            for d in image["detections"]
        ]

        report = {
            "source": source,
            "model": self.detector.network.config.name,
            "settings": dataclasses.asdict(self.detector.settings),
            "sizes": self.detector.sizes,
            "flip": self.detector.flip,
            "class_names": self.detector.class_names,
            "category_ids": self._categories,
            "images": images,
            "skipped": self.skipped,
        }
        write_json(self.out_dir / DETECTIONS_JSON, report, indent=1)
        write_json(self.out_dir / COCO_RESULTS_JSON, coco)

    def summary(self) -> str:
        count = self.num_images + self.num_frames
        rate = count / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.num_images} images"]
        if self.num_videos:
            parts.append(f"{self.num_videos} videos ({self.num_frames} frames)")
        lines = [
            f"detected in {', '.join(parts)}: {self.num_detections} detections, "
            f"{self.seconds:.1f} s ({rate:.2f} images/s)"
        ]
        if self.skipped:
            listed = ", ".join(f"{Path(s['file']).name} ({s['reason']})" for s in self.skipped)
            lines.append(f"skipped {len(self.skipped)}: {listed}")
        lines.append(f"results in {self.out_dir}: {DETECTIONS_JSON}, {COCO_RESULTS_JSON}")
        return "\n".join(lines)
