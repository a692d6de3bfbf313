"""`DetectRun`: detections for a list of inputs (images, videos, cameras) written to a folder.

What `m2det detect` runs: annotated images and videos, `detections.json` (per image: file, frame,
size, boxes with names) and `results_coco.json` (COCO results format).

Sharded and resumable. In a `torch.distributed` group (`torchrun`) process r of N handles the
inputs r, r+N, ... of those not done yet (`m2det.utils.distributed.shard`: each once, no padding).
Each process appends every image's record to its own JSON Lines file as soon as the image is done
(drawn and recorded; flushed at once): `detections.jsonl` for rank 0, `detections.rank{r}.jsonl`
for the others. A run started again on the same folder (`resume=True`) reads those files first
and skips every image they hold, so a killed run loses only the images in flight (a last line
cut short by the kill is dropped and that image done again). At the end rank 0 merges the files:
one record per (file, frame), in the order of the inputs, numbered from 1, into `detections.json`
and `results_coco.json`, and rewrites `detections.jsonl` as the merged list. The final files are
the same whatever the number of processes and however many times the run was restarted.

Images are decoded and resized in DataLoader workers (`workers`) while the network runs, the
batches pinned and copied without blocking on CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from m2det.errors import M2DetError
from m2det.io.lock import FileLock, LockHeld

DETECTIONS_JSON = "detections.json"
DETECTIONS_JSONL = "detections.jsonl"
COCO_RESULTS_JSON = "results_coco.json"
RUN_JSON = "detect_run.json"  # what made the records; a resumed run must detect the same way
LOCK_FILE = ".detect.lock"  # held by rank 0 while a run writes the folder


def coco_category_ids(class_names: list[str]) -> list[int]:
    """COCO category id of each label (index label - 1): COCO's own ids for a COCO model, else the label."""
    from m2det.classes import COCO_CATEGORY_IDS, COCO_CLASSES

    if tuple(class_names) == COCO_CLASSES:
        return list(COCO_CATEGORY_IDS)
    return list(range(1, len(class_names) + 1))


def part_path(out_dir: Path, rank: int) -> Path:
    """The JSON Lines file process `rank` appends its records to."""
    return out_dir / (DETECTIONS_JSONL if rank == 0 else f"detections.rank{rank}.jsonl")


def part_files(out_dir: Path) -> list[Path]:
    """Every process's records file in `out_dir` (of this run or an earlier one, any number of processes)."""
    found = [out_dir / DETECTIONS_JSONL] if (out_dir / DETECTIONS_JSONL).is_file() else []
    ranked = [p for p in out_dir.glob("detections.rank*.jsonl") if p.stem.split("rank")[-1].isdigit()]
    return found + sorted(ranked, key=lambda p: int(p.stem.split("rank")[-1]))


def record_key(record: dict[str, Any]) -> tuple[str, int]:
    """What a record is of: (file, frame); an image file's frame is -1."""
    frame = record.get("frame")
    return str(record["file"]), -1 if frame is None else int(frame)


# ----- decoding and resizing, in DataLoader workers -----
@dataclass
class _Decoded:
    """A batch as the loader hands it: positions in the run's list, originals (to draw), the
    resized inputs stacked (None when the pipeline resizes itself), original sizes, read errors."""

    positions: list[int]
    originals: list[Optional[Tensor]]
    resized: Optional[Tensor]
    sizes: list[tuple[int, int]]
    errors: list[str]

    def pin_memory(self) -> _Decoded:
        if self.resized is not None:
            self.resized = self.resized.pin_memory()
        return self


class _ImageFiles(torch.utils.data.Dataset):
    """Image files decoded by `m2det.io.image.read_image`, and resized to `size` (float in [0, 1])
    when given; `keep` also keeps the decoded original (for drawing, or when not resized)."""

    def __init__(self, paths: list[str], size: Optional[int], keep: bool) -> None:
        self.paths, self.size, self.keep = paths, size, keep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Optional[Tensor], Optional[Tensor], tuple[int, int], str]:
        from m2det.io.image import read_image
        from m2det.models.transform import resize_unit

        path = self.paths[index]
        try:
            image = read_image(path)
        except (ValueError, OSError) as exc:
            return index, None, None, (0, 0), str(exc).replace(f"{path}: ", "")
        resized = resize_unit(image, self.size) if self.size is not None else None
        keep = self.keep or resized is None
        return index, image if keep else None, resized, (int(image.shape[-2]), int(image.shape[-1])), ""


def _collate(samples: list[tuple[int, Optional[Tensor], Optional[Tensor], tuple[int, int], str]]) -> _Decoded:
    resized = [s[2] for s in samples if s[2] is not None]
    return _Decoded(
        positions=[s[0] for s in samples],
        originals=[s[1] for s in samples],
        resized=torch.stack(resized) if resized else None,
        sizes=[s[3] for s in samples],
        errors=[s[4] for s in samples],
    )


@dataclass
class DetectRun:
    """One detection run over `m2det.inference.sources` items: reads the inputs in batches, detects
    with `detector` (a `Detector`), draws, and records the results (each image's at once, as a line
    of this process's JSON Lines file; `write_json` merges them into the final files).

    `resume`: skip the inputs the folder's records already hold (else they are deleted first).
    `workers`: DataLoader processes that decode and resize images (0: this process does).
    """

    detector: Any
    out_dir: Path
    save: bool = True
    max_frames: Optional[int] = None
    progress: bool = True
    resume: bool = False
    workers: int = 0
    run_info: dict[str, Any] = field(default_factory=dict)  # e.g. the weights file; checked on resume
    skipped: list[dict] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)
    num_records: int = 0  # images and video frames recorded by this run (all processes after write_json)
    num_detections: int = 0
    num_images: int = 0
    num_frames: int = 0
    num_videos: int = 0
    num_done_before: int = 0  # images an earlier run had recorded, skipped by this one
    num_total: int = 0  # images and frames in the final files
    seconds: float = 0.0

    def __post_init__(self) -> None:
        from m2det.utils.distributed import rank_and_world

        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size = rank_and_world()
        self._categories = coco_category_ids(self.detector.class_names)
        self._records: Any = None
        self._lock: Optional[FileLock] = None
        self._items: list[Any] = []
        self._names: dict[str, str] = {}

    def __enter__(self) -> DetectRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        self._unlock()

    def close(self) -> None:
        """Close this process's records file (what it holds stays: one line per image recorded)."""
        if self._records is not None:
            self._records.close()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()

    # ----- what was done before -----
    def _settings(self) -> dict[str, Any]:
        return {
            "model": self.detector.network.config.name,
            "settings": dataclasses.asdict(self.detector.settings),
            "sizes": self.detector.sizes,
            "flip": self.detector.flip,
            "class_names": self.detector.class_names,
            **self.run_info,
        }

    def _prepare(self) -> set[tuple[str, int]]:
        """Rank 0 checks the folder's records (same settings, torn last lines cut) or clears them;
        then every process reads the records done. Returns their keys."""
        from m2det.io.jsonfile import read_json, read_json_lines, trim_torn_tail, write_json
        from m2det.utils.distributed import barrier, broadcast_object

        problem: Optional[str] = None
        if self.rank == 0:
            problem = self._lock_folder()
        if self.rank == 0 and problem is None:
            run_file = self.out_dir / RUN_JSON
            parts = part_files(self.out_dir)
            settings = self._settings()
            if self.resume and parts and run_file.is_file():
                stored = read_json(run_file, "detection run settings")
                if stored != settings:
                    changed = sorted(k for k in {*stored, *settings} if stored.get(k) != settings.get(k))
                    problem = (
                        f"{self.out_dir}: holds detections made with other {', '.join(changed)}; resuming "
                        "would mix them: give another --out, or --no-resume to start this folder again"
                    )
            if problem is None:
                if not self.resume:
                    for path in parts:
                        path.unlink()
                for path in part_files(self.out_dir):
                    trim_torn_tail(path)  # the line a kill cut short: that image is done again
                write_json(run_file, settings, indent=1)
        problem = broadcast_object(problem)
        if problem is not None:
            raise M2DetError(problem)
        barrier()
        done = {record_key(r) for path in part_files(self.out_dir) for r in read_json_lines(path)}
        barrier()  # nobody appends before every process has read
        return done

    def _lock_folder(self) -> Optional[str]:
        """Take the folder's lock (rank 0, for the whole run); the error when another run holds it."""
        try:
            self._lock = FileLock(self.out_dir / LOCK_FILE).acquire()
        except LockHeld as held:
            return (
                f"{self.out_dir}: another m2det detect (process {held.holder or '?'}) is writing to this "
                "folder; wait for it to finish (or stop it), or give another --out"
            )
        return None

    # ----- the loop -----
    def process(self, items: list) -> None:
        from m2det.io.jsonfile import JsonLinesWriter
        from m2det.progress import progress_bar
        from m2det.utils.distributed import shard

        start = time.perf_counter()
        self._items = list(items)
        self._names = self._output_names(self._items)
        if self.world_size > 1 and any(item.kind == "camera" for item in items):
            raise M2DetError("a camera is read by one process: run it without torchrun / --nproc")
        done = self._prepare()
        runnable = [item for item in items if item.kind in ("image", "video", "camera")]
        todo = [item for item in runnable if item.kind != "image" or (item.path, -1) not in done]
        self.num_done_before = sum(item.kind == "image" for item in runnable) - sum(
            item.kind == "image" for item in todo
        )
        mine = shard(todo, self.rank, self.world_size)
        self._records = JsonLinesWriter(part_path(self.out_dir, self.rank), append=True)
        images = [item.path for item in mine if item.kind == "image"]
        with progress_bar(total=len(images), unit="img", desc="detect", enabled=self.progress) as bar:
            self._bar = bar
            self._image_files(images)
            for item in mine:
                if item.kind != "image":
                    self._video(item)
        self.seconds = time.perf_counter() - start

    def _image_files(self, paths: list[str]) -> None:
        if not paths:
            return
        pipeline = self.detector.pipeline
        one_size = len(pipeline.sizes) == 1
        device = torch.device(self.detector.network.device)
        on_cuda = device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths, pipeline.sizes[0] if one_size else None, keep=self.save),
            batch_size=self.detector.batch_size,
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=on_cuda,
        )
        for batch in loader:
            readable = [k for k, error in enumerate(batch.errors) if not error]
            for k, error in enumerate(batch.errors):
                if error:
                    self._skip(paths[batch.positions[k]], error)
            if readable:
                if batch.resized is not None:
                    sizes = [batch.sizes[k] for k in readable]
                    outputs = pipeline.detect_resized(batch.resized.to(device, non_blocking=on_cuda), sizes)
                    results = [
                        {k: v.cpu() if isinstance(v, Tensor) else v for k, v in o.items()} for o in outputs
                    ]
                else:
                    results = self.detector.detect([batch.originals[k] for k in readable])
                for k, result in zip(readable, results):
                    path = paths[batch.positions[k]]
                    if self.save:
                        self._write_image(path, self._draw(batch.originals[k], result))
                    self._record(path, None, batch.sizes[k], result)  # recorded once drawn: then done
                    self.num_images += 1
            self._bar.update(len(batch.positions))

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
        target = self.out_dir / self._names[item.path]
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
            if self.save:
                if writer is None:
                    height, width = frame.shape[-2:]
                    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
                    if not writer.isOpened():
                        raise M2DetError(f"{path}: OpenCV cannot write mp4v video here; use --no-save")
                writer.write(self._draw(frame, result))
            size = (int(frame.shape[-2]), int(frame.shape[-1]))
            self._record(item.path if item.kind == "video" else item.name, first + offset, size, result)
        self.num_frames += len(batch)
        self._bar.update(len(batch))
        return writer

    # ----- results -----
    @staticmethod
    def _rgb(images: list[Any]) -> list[Any]:
        """Video frames (OpenCV's BGR HWC) as the RGB CHW tensors that both detection and drawing take."""
        from m2det.inference.detector import to_rgb_tensor

        return [to_rgb_tensor(image) for image in images]

    def _record(self, path: str, frame: Optional[int], size: tuple[int, int], result: dict) -> None:
        """Append the image's detections to this process's records file, flushed at once."""
        from m2det.inference.results import detection_records

        detections = detection_records(result)
        height, width = size
        self._records.write(
            {"file": str(path), "frame": frame, "width": width, "height": height, "detections": detections}
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

        target = self.out_dir / self._names[source]
        ok, encoded = cv2.imencode(target.suffix, bgr)
        if not ok:
            target = target.with_name(f"{target.name}.jpg")
            ok, encoded = cv2.imencode(".jpg", bgr)
        with atomic_path(target) as tmp:
            tmp.write_bytes(encoded.tobytes())
        self.outputs.append(target)

    @staticmethod
    def _output_names(items: list[Any]) -> dict[str, str]:
        """Each input's picture or video name in the output folder, made unique in input order when two
        inputs share a file name: the same in every process and every restart."""
        names: dict[str, str] = {}
        taken: set[str] = set()
        for item in items:
            if item.kind == "unsupported" or item.path in names:
                continue
            name = item.name if item.kind == "image" else Path(item.name).stem + ".mp4"
            stem, suffix = Path(name).stem, Path(name).suffix
            candidate, number = name, 1
            while candidate in taken:
                candidate = f"{stem}_{number}{suffix}"
                number += 1
            taken.add(candidate)
            names[item.path] = candidate
        return names

    def _skip(self, path: str, reason: str) -> None:
        """An input that could not be read: reported, and recorded (a resumed run does not try again)."""
        self.skipped.append({"file": str(path), "reason": reason})
        self._bar.write(f"skipped {path}: {reason}")
        if self._records is not None:
            self._records.write({"file": str(path), "frame": None, "skipped": reason})

    # ----- merging -----
    def write_json(self, source: str) -> None:
        """Wait for every process; rank 0 merges their records into `detections.json`,
        `results_coco.json` and a sorted `detections.jsonl` (each written atomically), and every
        process learns the run's totals."""
        from m2det.utils.distributed import all_gather_objects, barrier, broadcast_object

        self.close()
        counts = all_gather_objects(
            (self.num_records, self.num_detections, self.num_images, self.num_frames, self.num_videos)
        )
        self.num_records, self.num_detections, self.num_images, self.num_frames, self.num_videos = (
            sum(c[i] for c in counts) for i in range(5)
        )
        barrier()  # every record written
        summary: Any = None
        failure: Optional[BaseException] = None
        if self.rank == 0:
            try:
                summary = self._merge(source)
            except Exception as exc:
                if self.world_size == 1:
                    raise
                failure = exc
        self._unlock()
        failure, summary = broadcast_object((failure, summary))
        if failure is not None:
            raise failure
        self.skipped, self.num_total = summary

    def _merge(self, source: str) -> tuple[list[dict], int]:
        from m2det.inference.results import coco_result
        from m2det.io.atomic import atomic_path
        from m2det.io.jsonfile import finite_json, read_json_lines, write_json

        position = {item.path: k for k, item in enumerate(self._items)}
        parts = part_files(self.out_dir)
        unique: dict[tuple[str, int], dict] = {}
        for path in parts:
            for record in read_json_lines(path):
                if record["file"] in position:  # records of inputs no longer given are left out
                    unique.setdefault(record_key(record), record)
        ordered = sorted(unique.values(), key=lambda r: (position[r["file"]], record_key(r)[1]))
        images = [
            {"id": number, **r}
            for number, r in enumerate((r for r in ordered if "skipped" not in r), start=1)
        ]
        skipped = sorted(
            [{"file": item.path, "reason": item.reason} for item in self._items if item.kind == "unsupported"]
            + [{"file": r["file"], "reason": r["skipped"]} for r in ordered if "skipped" in r],
            key=lambda s: position.get(s["file"], len(position)),
        )
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
            "skipped": skipped,
        }
        write_json(self.out_dir / DETECTIONS_JSON, report, indent=1)
        write_json(self.out_dir / COCO_RESULTS_JSON, coco)
        # the merged records: the images as in detections.json, then the files that could not be read
        merged = images + [r for r in ordered if "skipped" in r]
        with atomic_path(self.out_dir / DETECTIONS_JSONL) as tmp:
            tmp.write_text("".join(json.dumps(finite_json(r)) + "\n" for r in merged), encoding="utf-8")
        for path in parts:
            if path.name != DETECTIONS_JSONL:
                path.unlink()
        return skipped, len(images)

    def summary(self) -> str:
        count = self.num_images + self.num_frames
        rate = count / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.num_images} images"]
        if self.num_videos:
            parts.append(f"{self.num_videos} videos ({self.num_frames} frames)")
        processes = f" in {self.world_size} processes" if self.world_size > 1 else ""
        lines = [
            f"detected in {', '.join(parts)}{processes}: {self.num_detections} detections, "
            f"{self.seconds:.1f} s ({rate:.2f} images/s)"
        ]
        if self.num_done_before:
            lines.append(f"resumed: {self.num_done_before} images were done by an earlier run and skipped")
        if self.skipped:
            listed = ", ".join(f"{Path(s['file']).name} ({s['reason']})" for s in self.skipped)
            lines.append(f"skipped {len(self.skipped)}: {listed}")
        lines.append(f"results in {self.out_dir}: {DETECTIONS_JSON}, {COCO_RESULTS_JSON}")
        return "\n".join(lines)
