"""`m2det detect SOURCE`: detections for an image, a folder, a glob, a video or a camera.

Writes annotated images and videos, `detections.json` (per image: file, frame, size, boxes with
names) and `results_coco.json` (COCO results format) into a fresh `runs/detect/expN` or `--out`.
Each image's detections are appended to `detections.jsonl` (per process, under torchrun) as soon
as they are found, so a run stopped by a crash, a kill or a full disk keeps what it did, and the
same command on the same --out goes on from there; the two JSON files are merged from them at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from m2det.cli.common import PRECISION_HELP, next_run_dir, parse_sizes, user_errors
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
        None,
        "--backend",
        help="pytorch | onnxruntime | openvino (default: the --weights file's: .onnx onnxruntime, .xml "
        "openvino; openvino with a .safetensors converts it in memory).",
    ),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP),
    resume: bool = typer.Option(
        True,
        "--resume/--no-resume",
        help="With --out: skip the images the folder's records already hold (a stopped run goes on); "
        "--no-resume starts the folder again.",
    ),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=0,
        help="Processes that decode and resize images while the network runs (default: from the cores "
        "free, per process; 0: none).",
    ),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        min=1,
        help="Detect in N processes (torchrun --nproc-per-node N, started for you), each on its share.",
    ),
) -> None:
    """Detect objects and write annotated pictures plus JSON (ours and COCO results)."""
    import warnings

    from m2det.boxes.postprocess import get_settings
    from m2det.cli.common import relaunch_with_torchrun
    from m2det.device import default_workers
    from m2det.engine import distributed
    from m2det.inference.detector import Detector
    from m2det.inference.network import check_backend_choice, check_precision_choice
    from m2det.inference.runner import DetectRun
    from m2det.inference.sources import resolve_source

    chosen_backend = check_backend_choice(
        backend, weights
    )  # before anything runs: a wrong choice fails at once
    check_precision_choice(precision, weights, chosen_backend)
    items = resolve_source(source)
    chosen = get_settings(settings)
    if nms is not None:
        chosen = chosen.replace(nms=nms)
    relaunch_with_torchrun(nproc)
    info, target = distributed.setup(device)
    try:
        if weights is None and info.is_main:
            typer.secho(
                "warning: no --weights given: the model has RANDOM weights and its detections mean nothing",
                err=True,
                fg=typer.colors.YELLOW,
                bold=True,
            )
        if weights is None and info.is_distributed:
            raise M2DetError(
                "several processes need one model: give --weights (random weights differ per process)"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="no weights given")
            detector = Detector(
                weights,
                preset=preset,
                device=target,
                score_threshold=score,
                settings=chosen,
                batch_size=batch,
                sizes=parse_sizes(sizes),
                flip=flip,
                precision=precision,
                backend=backend,
            )
        if workers is None:
            workers = default_workers(processes=info.world_size)
        fresh = out is None
        out_dir = distributed.broadcast_object(
            next_run_dir(Path("runs") / "detect") if fresh and info.is_main else out
        )
        run_info = {"weights": str(weights) if weights is not None else None, "preset": preset}
        if precision is not None:  # only then: a folder from before --precision still resumes
            run_info["precision"] = precision
        with DetectRun(
            detector,
            out_dir,
            save=save,
            max_frames=max_frames,
            progress=info.is_main,
            resume=resume and not fresh,
            workers=workers,
            run_info=run_info,
        ) as run:
            run.process(items)
        run.write_json(source)
    finally:
        distributed.cleanup()
    if info.is_main:
        typer.echo(run.summary())
    if run.num_total == 0:
        raise M2DetError(f"nothing could be read from {source}: all {len(run.skipped)} inputs were skipped")
