"""`m2det eval`: COCO metrics, Pascal VOC AP, per-class table and PR curves for a model or a results file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from m2det.cli.common import PRECISION_HELP, parse_sizes, user_errors
from m2det.errors import M2DetError

if TYPE_CHECKING:
    from m2det.engine.evaluate import EvalResult


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate_command)


@user_errors
def evaluate_command(
    data: str = typer.Option(
        ...,
        "--data",
        help="Ground truth: a COCO .json, a Pascal VOC folder, a YOLO data.yaml or a folder of images "
        "with VOC XML files beside them.",
    ),
    split: str = typer.Option(
        "val",
        "--split",
        help="VOC image set / YOLO split / image subfolder (a COCO json is one split).",
    ),
    weights: Optional[Path] = typer.Option(
        None,
        "--weights",
        help="Model to run: our .safetensors, an official .pth with --preset, or an export (.onnx, .xml).",
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Preset of an official .pth checkpoint, e.g. m2det512_vgg16."
    ),
    detections: Optional[Path] = typer.Option(
        None, "--detections", help="Score this COCO results .json instead of running a model."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a new runs/eval/expN)."),
    batch: int = typer.Option(8, "--batch", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: Optional[str] = typer.Option(
        None,
        "--backend",
        help="pytorch | onnxruntime | openvino (default: the --weights file's: .onnx onnxruntime, .xml "
        "openvino; openvino with a .safetensors converts it in memory).",
    ),
    settings: str = typer.Option(
        "paper",
        "--settings",
        help="Post-processing: paper (score > 0.05) or official (score > 0.1, +1 areas).",
    ),
    score: Optional[float] = typer.Option(
        None,
        "--score",
        min=0.0,
        max=1.0,
        help="Lowest score kept, after NMS, and the candidate threshold (default: the settings', for AP).",
    ),
    sizes: Optional[str] = typer.Option(
        None, "--sizes", help="Multi-scale testing: input sizes, comma separated, e.g. 320,512."
    ),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="Also run on mirrored images and merge."),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=0,
        help="Processes decoding and resizing images while the model runs (default: one core less "
        "than the process's share, at most 8; 0: in the main process).",
    ),
    max_images: Optional[int] = typer.Option(
        None, "--max-images", min=1, help="Score only the first N images."
    ),
    voc_plus_one: Optional[bool] = typer.Option(
        None,
        "--voc-plus-one/--no-voc-plus-one",
        help="VOC AP with the devkit's +1 pixel areas (default: on for VOC data, off otherwise).",
    ),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        min=1,
        help="Run the model in N processes (torchrun --nproc-per-node N, started for you), each on its "
        "share of the images.",
    ),
) -> None:
    """Evaluate detections: COCO AP/AR (pycocotools), VOC AP (2007 11-point and area), per class.

    Writes metrics.json, per_class.csv, pr_curve.png and detections.json (COCO results format).
    """
    from m2det.cli.common import next_run_dir, relaunch_with_torchrun
    from m2det.device import default_workers
    from m2det.engine import distributed
    from m2det.engine.evaluate import evaluate_weights, score_results_file

    if (weights is None) == (detections is None):
        raise M2DetError("give exactly one of --weights (run a model) or --detections (score a results file)")
    if detections is not None and preset is not None:
        raise M2DetError("--preset goes with --weights (an official .pth checkpoint), not with --detections")
    if detections is not None and precision is not None:
        raise M2DetError("--precision goes with --weights (a model to run), not with --detections")
    if detections is not None and backend is not None:
        raise M2DetError("--backend goes with --weights (the model to run), not with --detections")
    if weights is not None:
        from m2det.inference.network import check_backend_choice, check_precision_choice

        check_precision_choice(precision, weights, check_backend_choice(backend, weights))
    if detections is not None:
        if not distributed.env_info().is_main:
            return  # scoring a file is one process's work
        result, extra = score_results_file(
            detections, data, split, max_images=max_images, voc_plus_one=voc_plus_one
        )
    else:
        assert weights is not None  # one of the two, checked above
        relaunch_with_torchrun(nproc)
        # under torchrun: each process runs its share of the images, rank 0 scores them all
        info, target = distributed.setup(device)
        if workers is None:
            workers = default_workers(processes=info.world_size)
        try:
            result, extra = evaluate_weights(
                weights,
                data,
                split,
                preset=preset,
                device=str(target),
                settings=settings,
                score_threshold=score,
                sizes=parse_sizes(sizes),
                flip=flip,
                precision=precision,
                batch_size=batch,
                workers=workers,
                max_images=max_images,
                voc_plus_one=voc_plus_one,
                backend=backend,
            )
        finally:
            distributed.cleanup()
        if not info.is_main:
            return
        extra["processes"] = info.world_size
    out_dir = out if out is not None else next_run_dir("runs/eval", "exp")
    paths = result.save(out_dir, extra=extra)
    _print_report(result, out_dir, paths)


def _fmt(value: float) -> str:
    return "-" if value != value or value < 0 else f"{value:.4f}"  # NaN, or pycocotools' -1: no data


def _print_report(result: EvalResult, out_dir: Path, paths: dict[str, Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 100))
    overall = Table(title=f"Overall ({result.num_images} images, {len(result.detections_coco)} detections)")
    groups = [
        ("COCO AP", ["AP", "AP50", "AP75", "APs", "APm", "APl"]),
        ("COCO AR", ["AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]),
        ("VOC IoU .5", ["VOC_AP07", "VOC_AP"]),
    ]
    for title, _ in groups:
        overall.add_column(title)
        overall.add_column("", justify="right")
    for i in range(max(len(names) for _, names in groups)):
        cells: list[str] = []
        for _, names in groups:
            cells += [names[i], _fmt(result.metrics[names[i]])] if i < len(names) else ["", ""]
        overall.add_row(*cells)
    console.print(overall)
    per_class = Table(title="Per class (COCO AP at IoU .50:.95 and .50; VOC AP at .50)")
    for column in ("class", "id", "GT", "AP", "AP50", "VOC AP07", "VOC AP"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for row in result.per_class:
        per_class.add_row(
            row.name,
            str(row.category_id),
            str(row.num_gt),
            *(_fmt(v) for v in (row.ap, row.ap50, row.voc_ap07, row.voc_ap)),
        )
    console.print(per_class)
    if result.note:
        console.print(f"note: {result.note}")
    if result.seconds:
        console.print(
            f"inference: {result.seconds:.1f} s ({result.num_images / result.seconds:.1f} images/s)"
        )
    console.print(f"wrote {', '.join(p.name for p in paths.values())} to {out_dir}")
