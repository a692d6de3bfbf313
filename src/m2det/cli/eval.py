"""`m2det eval`: COCO metrics, Pascal VOC AP, per-class table and PR curves for a model or a results file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from m2det.cli.common import parse_sizes, user_errors
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
        None, "--weights", help="Model to run: our .safetensors, or an official .pth with --preset."
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
    workers: int = typer.Option(0, "--workers", min=0, help="Data loading processes."),
    max_images: Optional[int] = typer.Option(
        None, "--max-images", min=1, help="Score only the first N images."
    ),
    voc_plus_one: Optional[bool] = typer.Option(
        None,
        "--voc-plus-one/--no-voc-plus-one",
        help="VOC AP with the devkit's +1 pixel areas (default: on for VOC data, off otherwise).",
    ),
) -> None:
    """Evaluate detections: COCO AP/AR (pycocotools), VOC AP (2007 11-point and area), per class.

    Writes metrics.json, per_class.csv, pr_curve.png and detections.json (COCO results format).
    """
    from m2det.cli.common import next_run_dir
    from m2det.data import build_dataset
    from m2det.engine.evaluate import evaluate, is_voc

    if (weights is None) == (detections is None):
        raise M2DetError("give exactly one of --weights (run a model) or --detections (score a results file)")
    if detections is not None and preset is not None:
        raise M2DetError("--preset goes with --weights (an official .pth checkpoint), not with --detections")
    extra: dict[str, Any] = {"data": str(data), "split": split}
    if detections is not None:
        result, extra["voc_plus_one"] = _score_results_file(detections, data, split, max_images, voc_plus_one)
        extra["detections"] = str(detections)
    else:
        from dataclasses import asdict

        from m2det.device import resolve_device
        from m2det.inference.detector import Detector

        dataset = build_dataset(data, split, keep_ignored=True)
        pixel_inclusive = is_voc(dataset) if voc_plus_one is None else voc_plus_one
        extra["voc_plus_one"] = pixel_inclusive
        detector = Detector(
            weights,
            preset=preset,
            device=resolve_device(device),
            score_threshold=score,
            settings=settings,
            batch_size=batch,
            sizes=parse_sizes(sizes),
            flip=flip,
        )
        result = evaluate(
            detector,
            dataset,
            batch_size=batch,
            workers=workers,
            max_images=max_images,
            voc_pixel_inclusive=pixel_inclusive,
        )
        extra.update(
            weights=str(weights),
            model=detector.model.config.name,
            settings=asdict(detector.settings),
            sizes=detector.sizes,
            flip=detector.flip,
            device=str(detector.device),
        )
    out_dir = out if out is not None else next_run_dir("runs/eval", "exp")
    paths = result.save(out_dir, extra=extra)
    _print_report(result, out_dir, paths)


def _score_results_file(
    detections: Path, data: str, split: str, max_images: Optional[int], voc_plus_one: Optional[bool]
) -> tuple[EvalResult, bool]:
    """Score a COCO results file (all images, or the first `max_images`); also return whether VOC AP
    used the +1 pixel convention.

    A COCO json is read as written and scored as pycocotools scores it, so the numbers are
    pycocotools' to the last digit and no image files are needed. VOC and YOLO ground truth goes
    through the data set, which turns it into COCO form.
    """
    from m2det.data import build_dataset
    from m2det.engine.evaluate import (
        dataset_category_ids,
        is_voc,
        read_coco_gt,
        read_detections,
        score_detections,
    )

    category_ids: Optional[list[int]] = None  # a COCO json's own ids
    if Path(data).suffix.lower() == ".json":  # a COCO json, as build_dataset decides
        coco_gt = read_coco_gt(data)
        image_ids = [image["id"] for image in coco_gt.dataset["images"]]
        pixel_inclusive = bool(voc_plus_one)
    else:
        dataset = build_dataset(data, split, keep_ignored=True)
        coco_gt = dataset.coco_gt()
        category_ids = dataset_category_ids(dataset)
        image_ids = [dataset.image_info(i).image_id for i in range(len(dataset))]
        pixel_inclusive = is_voc(dataset) if voc_plus_one is None else voc_plus_one
    result = score_detections(
        coco_gt,
        read_detections(detections, coco_gt, category_ids),
        category_ids=category_ids,
        image_ids=image_ids[:max_images],
        voc_pixel_inclusive=pixel_inclusive,
    )
    return result, pixel_inclusive


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
