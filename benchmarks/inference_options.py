"""Which parts of the fast inference path pay, on this machine: network time per variant.

Variants of one preset (random weights) are timed in interleaved rounds, so that a change in the
machine's load hits every variant alike, beside the reference 3x3 conv of `m2det bench`:
eager PyTorch (NCHW), BatchNorm folding, channels-last, both (the default of
`optimize_for_inference`), optionally torch.compile and bf16 autocast, and ONNX Runtime FP32 / INT8.
Each variant's outputs are checked against eager's first.

    python benchmarks/inference_options.py [--preset m2det320_vgg16] [--batch 1] [--repeats 7]
        [--threads 2] [--compile] [--bf16] [--onnx] [--int8 CALIB_DATA]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import m2det
from m2det.deploy import optimize_for_inference
from m2det.engine.bench import reference_conv
from m2det.models.complexity import measure
from m2det.utils.timing import Stopwatch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="m2det320_vgg16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="add torch.compile (compiles for minutes)")
    parser.add_argument("--bf16", action="store_true", help="add bf16 autocast (changes outputs)")
    parser.add_argument("--onnx", action="store_true", help="add ONNX Runtime FP32")
    parser.add_argument("--int8", metavar="CALIB_DATA", help="add ONNX Runtime INT8 calibrated on this data")
    parser.add_argument("--calib-num", type=int, default=32)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = m2det.build_model(args.preset, **{"backbone.weights": None}).eval()
    gflops = measure(model.config).gflops * args.batch
    x = model.normalize(torch.rand(args.batch, 3, model.config.input_size, model.config.input_size))

    def eager(x: torch.Tensor = x) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return model.forward_raw(x)

    variants: dict[str, Callable[[], object]] = {"eager NCHW": eager}
    for name, fold, channels_last in (
        ("folded NCHW", True, False),
        ("channels-last", False, True),
        ("folded + channels-last (default)", True, True),
    ):
        fast = optimize_for_inference(model, fold_batchnorm=fold, channels_last=channels_last)
        variants[name] = lambda fast=fast: fast.forward_raw(x)
    if args.bf16:
        fast = optimize_for_inference(model, precision="bf16")
        variants["default + bf16 autocast"] = lambda fast=fast: fast.forward_raw(x)
    if args.compile:
        fast = optimize_for_inference(model, compile=True)
        start = time.perf_counter()
        fast.forward_raw(x)
        print(f"torch.compile: first call (compilation) {time.perf_counter() - start:.0f} s")
        variants["default + torch.compile"] = lambda fast=fast: fast.forward_raw(x)
    tmp = tempfile.TemporaryDirectory()
    if args.onnx or args.int8:
        from m2det.deploy.export import export_onnx
        from m2det.deploy.onnx_backend import OnnxRuntimeNetwork

        fp32 = Path(tmp.name) / "fp32.onnx"
        export_onnx(model, fp32)
        runtime = OnnxRuntimeNetwork(fp32, threads=torch.get_num_threads())
        variants["onnxruntime FP32"] = lambda: runtime(x)
        if args.int8:
            from m2det.deploy.quantize import calibration_reader, quantize_onnx

            reader = calibration_reader(fp32, args.int8, "train", args.calib_num)
            report = quantize_onnx(fp32, Path(tmp.name) / "int8.onnx", reader, source=args.int8)
            print(report.summary())
            int8 = OnnxRuntimeNetwork(Path(tmp.name) / "int8.onnx", threads=torch.get_num_threads())
            variants["onnxruntime INT8"] = lambda: int8(x)

    expected = eager()
    for name, run in variants.items():
        loc, logits = run()[:2]
        error = max(
            float((a.float() - b).abs().max() / b.abs().max().clamp(min=1))
            for a, b in zip((loc, logits), expected)
        )
        print(f"{name:34s} largest relative difference from eager: {error:.1e}")
        run()  # warm-up
    ref_run, ref_gflops = reference_conv(args.batch, torch.device("cpu"), None, channels_last=True)
    ref_run()
    timings = Stopwatch(torch.device("cpu")).interleaved(
        {**variants, "reference conv": ref_run}, args.repeats, calls={"reference conv": 3}
    )
    ref_rate = ref_gflops / (timings.pop("reference conv").median_ms / 1e3)
    eager_ms = timings["eager NCHW"].median_ms
    print(
        f"\n{args.preset}, batch {args.batch}, {torch.get_num_threads()} threads, {gflops:.1f} GFLOPs; "
        f"reference conv {ref_rate:.0f} GFLOP/s; median of {args.repeats} interleaved rounds"
    )
    print(f"{'variant':34s} {'ms':>9s} {'p25-p75 ms':>15s} {'GFLOP/s':>8s} {'of ref':>7s} {'vs eager':>8s}")
    for name, t in timings.items():
        rate = gflops / (t.median_ms / 1e3)
        print(
            f"{name:34s} {t.median_ms:9.1f} {t.p25_ms:7.1f}-{t.p75_ms:<7.1f} {rate:8.1f} {100 * rate / ref_rate:6.0f}% "
            f"{eager_ms / t.median_ms:7.2f}x"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
