"""`m2det bench`: latency, throughput, memory and GFLOP/s of a model against the machine's own conv
speed; with `--backends`, every installed runtime and precision compared in one run."""

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
        help="Measure this model instead: our .safetensors, an .onnx export (onnxruntime) or an OpenVINO "
        ".xml (openvino).",
    ),
    size: Optional[int] = typer.Option(None, "--size", min=32, help="Input size (default: the model's)."),
    num_classes: Optional[int] = typer.Option(
        None, "--num-classes", min=2, help="Classes incl. background (presets)."
    ),
    batch: Optional[list[int]] = typer.Option(
        None,
        "--batch",
        min=1,
        help="Batch sizes for throughput (repeatable; default 1, 8, 32; --backends: 1).",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    backend: Optional[str] = typer.Option(
        None,
        "--backend",
        help="pytorch, onnxruntime or openvino (default: the --weights file's, else pytorch).",
    ),
    backends: Optional[str] = typer.Option(
        None,
        "--backends",
        help="Compare runtimes in one run: all, or a comma-separated list of pytorch, onnxruntime, openvino "
        "(each in every precision it has: FP32, Winograd, bf16, INT8).",
    ),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help="--backends: the row speeds are relative to (default: pytorch-eager)."
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="--backends: score each runtime on this data set (COCO .json, VOC, YOLO .yaml)."
    ),
    split: str = typer.Option("val", "--split", help="--backends: the split of --data to score on."),
    max_images: Optional[int] = typer.Option(
        None, "--max-images", min=1, help="--backends: score only the first N images."
    ),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="--backends: also the INT8 runtimes."),
    calib_data: Optional[str] = typer.Option(
        None, "--calib-data", help="--backends: INT8 calibration data (default: --data, else random images)."
    ),
    calib_split: str = typer.Option(
        "train", "--calib-split", help="--backends: split of the calibration data."
    ),
    calib_num: int = typer.Option(300, "--calib-num", min=1, help="--backends: INT8 calibration images."),
    float_heads: bool = typer.Option(
        False, "--float-heads/--int8-heads", help="--backends: INT8 keeps the loc/conf head convs in float."
    ),
    settle: float = typer.Option(
        1.0, "--settle", min=0.0, help="--backends: seconds of pause before each timed call."
    ),
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
        "fp32",
        "--precision",
        help="PyTorch: fp32, winograd (CPU), fp16 or bf16 (bf16/fp16 on a CPU only where it has them).",
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

    model = str(weights) if weights is not None else preset
    if backends is not None:
        if backend is not None:
            raise M2DetError("give --backend (one runtime, in detail) or --backends (a comparison), not both")
        if device != "cpu":
            raise M2DetError("--backends compares the CPU runtimes: leave out --device")
        _compare_runtimes(
            model, size, num_classes, backends, baseline, batch or [1], threads, warmup, repeats, settle,
            data, split, max_images, settings, int8, calib_data, calib_split, calib_num, float_heads, out,
        )  # fmt: skip
        return
    if image is not None and not image.is_file():
        raise FileNotFoundError(f"--image: file not found: {image}")
    if load == "model" and weights is None:
        raise M2DetError(
            "--load model measures a trained model's own output: give --weights (and an --image)"
        )
    if backend is None:
        from m2det.inference.network import check_backend_choice

        backend = check_backend_choice(None, weights)
    settings_obj = BenchSettings(
        model=model,
        input_size=size,
        num_classes=num_classes,
        device=device,
        backend=backend,
        threads=threads,
        batch_sizes=tuple(batch or [1, 8, 32]),
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


def _compare_runtimes(
    model: str,
    size: Optional[int],
    num_classes: Optional[int],
    backends: str,
    baseline: Optional[str],
    batch: list[int],
    threads: Optional[int],
    warmup: int,
    repeats: int,
    settle: float,
    data: Optional[str],
    split: str,
    max_images: Optional[int],
    settings: str,
    int8: bool,
    calib_data: Optional[str],
    calib_split: str,
    calib_num: int,
    float_heads: bool,
    out: Optional[Path],
) -> None:
    """`--backends`: every runtime in one run; prints the table, writes JSON, CSV and Markdown."""
    from rich.console import Console
    from rich.table import Table

    from m2det.cli.common import next_run_dir
    from m2det.engine.bench_runtimes import (
        RuntimeBenchSettings,
        parse_backends,
        run_runtime_bench,
        table_rows,
        title,
        write_results,
    )

    if Path(model).suffix in (".onnx", ".xml"):
        raise M2DetError(
            f"--backends builds every runtime from one PyTorch model: give a preset or a .safetensors, not {model}"
        )
    result = run_runtime_bench(
        RuntimeBenchSettings(
            model=model,
            input_size=size,
            num_classes=num_classes,
            backends=parse_backends(backends),
            int8=int8,
            threads=threads,
            batch_sizes=tuple(batch),
            warmup=warmup,
            repeats=repeats,
            settle_s=settle,
            baseline=baseline,
            data=data,
            split=split,
            max_images=max_images,
            postprocess=settings,
            calib_data=calib_data,
            calib_split=calib_split,
            calib_num=calib_num,
            float_heads=float_heads,
        ),
        log=lambda message: typer.echo(f"  {message}", err=True),
    )
    path = out if out is not None else next_run_dir(Path("runs") / "bench") / "runtimes.json"
    written = write_results(result, path)
    rows = list(table_rows(result))
    table = Table(title=title(result))
    for column in rows[0]:
        table.add_column(column, justify="left" if column in ("runtime", "status", "note") else "right")
    for row in rows:
        table.add_row(*row.values())
    Console(width=max(Console().width, 160)).print(table)
    typer.echo(f"wrote {', '.join(str(p) for p in written)}")


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
