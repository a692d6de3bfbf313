"""`m2det bench`: latency, throughput, memory and GFLOP/s of a model against the machine's own conv speed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from m2det.cli.common import user_errors
from m2det.errors import M2DetError


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


@user_errors
def bench(
    preset: str = typer.Option("m2det320_vgg16", "--preset", help="Preset to measure (random weights)."),
    weights: Optional[Path] = typer.Option(
        None,
        "--weights",
        help="Measure this model instead: our .safetensors, or an .onnx export (onnxruntime).",
    ),
    size: Optional[int] = typer.Option(None, "--size", min=32, help="Input size (default: the model's)."),
    num_classes: Optional[int] = typer.Option(
        None, "--num-classes", min=2, help="Classes incl. background (presets)."
    ),
    batch: list[int] = typer.Option(
        [1, 8, 32], "--batch", min=1, help="Batch sizes for throughput (repeatable)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    backend: str = typer.Option("pytorch", "--backend", help="pytorch or onnxruntime."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed runs before each measurement."),
    repeats: int = typer.Option(
        10, "--repeats", min=1, help="Timed runs per measurement (median and spread)."
    ),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="PyTorch: the fast inference path."),
    channels_last: Optional[bool] = typer.Option(
        None, "--channels-last/--no-channels-last", help="Override."
    ),
    compile_model: Optional[bool] = typer.Option(
        None, "--compile/--no-compile", help="torch.compile (override)."
    ),
    precision: str = typer.Option(
        "fp32", "--precision", help="PyTorch: fp32, fp16 or bf16 (bf16/fp16 on a CPU only where it has them)."
    ),
    settings: str = typer.Option("paper", "--settings", help="Post-processing: paper or official."),
    load: str = typer.Option(
        "synthetic", "--load", help="Post-processing load: synthetic (--boxes above the threshold) or model."
    ),
    boxes: int = typer.Option(1000, "--boxes", min=0, help="Synthetic load: scores above the threshold."),
    image: Optional[Path] = typer.Option(
        None, "--image", help="A real image for preprocessing (and --load model)."
    ),
    reference: bool = typer.Option(
        True, "--reference/--no-reference", help="Measure the reference 3x3 conv."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="JSON file (default: runs/bench/expN/bench.json)."
    ),
) -> None:
    """Measure speed: per-image latency (preprocess / network / post-process), throughput per batch
    size, peak memory, GFLOP/s and the fraction of a reference conv's throughput; prints and writes JSON."""
    from m2det.cli.common import next_run_dir
    from m2det.engine.bench import BenchSettings, run_bench
    from m2det.io.jsonfile import write_json

    if image is not None and not image.is_file():
        raise FileNotFoundError(f"--image: file not found: {image}")
    if load == "model" and weights is None:
        raise M2DetError(
            "--load model measures a trained model's own output: give --weights (and an --image)"
        )
    settings_obj = BenchSettings(
        model=str(weights) if weights is not None else preset,
        input_size=size,
        num_classes=num_classes,
        device=device,
        backend=backend,
        threads=threads,
        batch_sizes=tuple(batch),
        warmup=warmup,
        repeats=repeats,
        optimize=optimize,
        channels_last=channels_last,
        compile=compile_model,
        precision=precision,
        postprocess=settings,
        postprocess_load=load,
        boxes_above_threshold=boxes,
        image=str(image) if image is not None else None,
        reference=reference,
    )
    result = run_bench(settings_obj, log=lambda message: typer.echo(f"  {message}", err=True))
    path = write_json(
        out if out is not None else next_run_dir(Path("runs") / "bench") / "bench.json", result, indent=2
    )
    _print(result)
    typer.echo(f"wrote {path}")


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    lat = result["latency_batch1"]
    load = result["postprocess_load"]
    title = (
        f"{result['config_name']} at {result['input_size']}, {result['backend']} ({result['precision']}) on "
        f"{result['device']}, {result['threads']} threads, {result['gflops_per_image']:.1f} GFLOPs/image"
    )
    latency = Table(title=f"Latency per image, batch 1 (median of {lat['network']['runs']})")
    for column in ("stage", "median ms", "p25-p75 ms", "min-max ms"):
        latency.add_column(column, justify="left" if column == "stage" else "right")
    for stage in ("preprocess", "network", "postprocess"):
        t = lat[stage]
        latency.add_row(
            stage,
            f"{t['median_ms']:.2f}",
            f"{t['p25_ms']:.2f}-{t['p75_ms']:.2f}",
            f"{t['min_ms']:.2f}-{t['max_ms']:.2f}",
        )
    latency.add_row("total", f"{lat['total_median_ms']:.2f}", "", "")
    console.print(title)
    console.print(latency)
    console.print(
        f"post-processing load: {load['boxes_above_threshold']} scores above {load['score_threshold']} "
        f"({load['source']}, {load['nms']} NMS), {load['detections_kept']} kept; "
        f"post-processing = {100 * lat['postprocess_fraction_of_network']:.1f}% of the network time"
    )
    table = Table(title="Throughput (network only)")
    for column in ("batch", "ms/batch", "images/s", "GFLOP/s", "ref conv GFLOP/s", "of ref", "peak MB"):
        table.add_column(column, justify="right")
    for row in result["throughput"]:
        ref = row.get("reference_conv")
        table.add_row(
            str(row["batch"]),
            f"{row['network']['median_ms']:.1f}",
            f"{row['images_per_s']:.2f}",
            f"{row['network_gflops_per_s']:.1f}",
            f"{ref['gflops_per_s']:.1f}" if ref else "-",
            f"{100 * row['fraction_of_reference']:.0f}%" if ref else "-",
            f"{row['peak_memory_mb']:.0f}",
        )
    console.print(table)
    console.print(f"peak memory: {result['peak_memory_method']}")
