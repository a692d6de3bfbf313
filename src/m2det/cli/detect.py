"""`m2det detect SOURCE`: detections for an image, a folder, a glob, a video or a camera.

Writes annotated images and videos, `detections.json` (per image: file, frame, size, boxes with
names) and `results_coco.json` (COCO results format) into a fresh `runs/detect/expN` or `--out`.
Each image's detections are appended to `detections.jsonl` as soon as they are found, so a run
stopped by a crash or a full disk keeps what it did; the two JSON files are built from it at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from m2det.cli.common import next_run_dir, parse_sizes, user_errors
from m2det.errors import M2DetError

# Detections scoring below this (after NMS) are neither written nor drawn, as in other detectors'
# demos; evaluation keeps every box instead (its AP needs the low-scoring ones).
DEFAULT_SCORE = 0.3


def register(app: typer.Typer) -> None:
    app.command("detect")(detect)


@user_errors
def detect(
    source: str = typer.Argument(
        ..., help="An image, a folder, a glob ('imgs/*.jpg', quoted), a video file or a camera index (0)."
    ),
    weights: Optional[Path] = typer.Option(
        None, "--weights", "-w", help="Our .safetensors model file, or an official .pth with --preset."
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Architecture of an official .pth (or of random weights), e.g. m2det512_vgg16."
    ),
    score: float = typer.Option(
        DEFAULT_SCORE,
        "--score",
        min=0.0,
        max=1.0,
        help="Lowest score written and drawn, after NMS (which lowers scores); also the candidate threshold.",
    ),
    settings: str = typer.Option("paper", "--settings", help="Post-processing: paper | official."),
    nms: Optional[str] = typer.Option(
        None, "--nms", help="hard | linear | gaussian (default: the settings')."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    batch: int = typer.Option(8, "--batch", min=1, help="Images (or video frames) per forward pass."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (default: a fresh runs/detect/expN)."
    ),
    sizes: Optional[str] = typer.Option(
        None, "--sizes", help="Multi-scale testing: input sizes, comma separated, e.g. 320,512."
    ),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="Also detect on the mirrored image and merge."),
    max_frames: Optional[int] = typer.Option(
        None, "--max-frames", min=1, help="Stop each video or camera after this many frames."
    ),
    save: bool = typer.Option(True, "--save/--no-save", help="Write annotated images and videos."),
    backend: Optional[str] = typer.Option(
        None, "--backend", help="pytorch | onnxruntime (default: onnxruntime for an .onnx --weights file)."
    ),
) -> None:
    """Detect objects and write annotated pictures plus JSON (ours and COCO results)."""
    import warnings

    from m2det.boxes.postprocess import get_settings
    from m2det.inference.detector import Detector
    from m2det.inference.network import check_backend_choice
    from m2det.inference.runner import DetectRun
    from m2det.inference.sources import resolve_source

    check_backend_choice(backend, weights)  # an .onnx file loads as an ONNX Runtime model below
    items = resolve_source(source)
    chosen = get_settings(settings)
    if nms is not None:
        chosen = chosen.replace(nms=nms)
    if weights is None:
        typer.secho(
            "warning: no --weights given: the model has RANDOM weights and its detections mean nothing",
            err=True,
            fg=typer.colors.YELLOW,
            bold=True,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no weights given")
        detector = Detector(
            weights,
            preset=preset,
            device=device,
            score_threshold=score,
            settings=chosen,
            batch_size=batch,
            sizes=parse_sizes(sizes),
            flip=flip,
        )
    out_dir = out if out is not None else next_run_dir(Path("runs") / "detect")
    with DetectRun(detector, out_dir, save=save, max_frames=max_frames) as run:
        run.process(items)
    run.write_json(source)
    typer.echo(run.summary())
    if run.num_images + run.num_frames == 0:
        raise M2DetError(f"nothing could be read from {source}: all {len(run.skipped)} inputs were skipped")
