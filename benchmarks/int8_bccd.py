"""INT8 on the CPU for a model trained on BCCD: accuracy and speed of FP32 vs INT8 (ONNX Runtime).

Exports the model to ONNX (FP32), quantises it statically (QDQ, per-channel int8 weights, uint8
activations) on `--calib-num` images of the calibration split, then

* scores PyTorch, ONNX Runtime FP32 and ONNX Runtime INT8 on the test split with
  `m2det.engine.evaluate.evaluate` (what `m2det eval` runs): mAP@0.5 (COCO AP50 and VOC AP),
* times the network at batch 1 for each, one runtime at a time (median, p25-p75).

    python benchmarks/int8_bccd.py MODEL.safetensors [--data ../shared/data/bccd] [--calib-split train]
        [--calib-num 300] [--calib-method minmax] [--float-heads] [--test-split test] [--threads 2] [--repeats 10] [--out DIR]

The same comparison from the command line:
    m2det export fp32.onnx --weights MODEL.safetensors
    m2det export int8.onnx --weights MODEL.safetensors --int8 --calib-data DATA --calib-split train
    m2det eval --data DATA --split test --weights fp32.onnx   (and int8.onnx, MODEL.safetensors)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from m2det.data import build_dataset
from m2det.deploy import optimize_for_inference
from m2det.deploy.calibration import report_dict
from m2det.deploy.export import export_onnx
from m2det.deploy.onnx_backend import OnnxRuntimeNetwork
from m2det.deploy.quantize import CALIBRATION_METHODS, calibration_reader, quantize_onnx
from m2det.engine.evaluate import evaluate
from m2det.models.loading import load_model
from m2det.utils.timing import Stopwatch

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model", type=Path, help="a trained model (.safetensors), e.g. from benchmarks/train_bccd.py"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--calib-split", default="train")
    parser.add_argument("--calib-num", type=int, default=300)
    parser.add_argument("--calib-method", default="minmax", choices=CALIBRATION_METHODS)
    parser.add_argument("--float-heads", action="store_true", help="keep the loc/conf head convs in float")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--settings", default="paper", help="post-processing: paper or official")
    parser.add_argument("--out", type=Path, default=None, help="folder for the .onnx files and results.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="m2det_int8_"))
    out.mkdir(parents=True, exist_ok=True)

    model = load_model(args.model).eval()
    fp32_path, int8_path = out / "fp32.onnx", out / "int8.onnx"
    export_onnx(model, fp32_path)
    reader = calibration_reader(fp32_path, args.data, args.calib_split, args.calib_num)
    print(f"calibrating on {len(reader)} images of {args.data.name}/{args.calib_split} ...")
    quantization = quantize_onnx(
        fp32_path,
        int8_path,
        reader,
        source=f"{args.data.name}/{args.calib_split}",
        calibration=args.calib_method,
        float_heads=args.float_heads,
    )
    print(quantization.summary())

    runtimes = {
        "pytorch fp32": optimize_for_inference(model),
        "onnxruntime fp32": OnnxRuntimeNetwork(fp32_path, threads=torch.get_num_threads()),
        "onnxruntime int8": OnnxRuntimeNetwork(int8_path, threads=torch.get_num_threads()),
    }
    test_set = build_dataset(args.data, args.test_split, keep_ignored=True)
    accuracy = {}
    for name, runtime in runtimes.items():
        result = evaluate(runtime, test_set, settings=args.settings, progress=False, batch_size=8)
        accuracy[name] = {key: result.metrics[key] for key in ("AP50", "AP", "VOC_AP07", "VOC_AP")}

    size = model.config.input_size
    x = model.normalize(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
    fns = {name: (lambda runtime=runtime: runtime.forward_raw(x)) for name, runtime in runtimes.items()}
    stopwatch = Stopwatch(torch.device("cpu"))
    # One runtime at a time: on few cores, the thread pool of the runtime that just ran (PyTorch's
    # OpenMP threads, ONNX Runtime's spinning workers) keeps the cores busy for a while after each
    # call and would slow whichever runs right after it in an interleaved loop.
    timings = {name: stopwatch.repeat(fn, warmup=3, repeats=args.repeats) for name, fn in fns.items()}
    print(
        f"\n{model.config.name} at {size}, {len(test_set)} {args.test_split} images, {torch.get_num_threads()} threads; "
        f"network at batch 1, median of {args.repeats} runs each"
    )
    print(
        f"{'runtime':18s} {'AP50':>7s} {'VOC AP':>7s} {'COCO AP':>8s} {'ms':>8s} {'p25-p75 ms':>15s} {'speed-up':>8s}"
    )
    base = timings["onnxruntime fp32"].median_ms
    for name, t in timings.items():
        a = accuracy[name]
        print(
            f"{name:18s} {100 * a['AP50']:7.2f} {100 * a['VOC_AP']:7.2f} {100 * a['AP']:8.2f} {t.median_ms:8.1f} "
            f"{t.p25_ms:7.1f}-{t.p75_ms:<7.1f} {base / t.median_ms:7.2f}x"
        )
    change = 100 * (accuracy["onnxruntime int8"]["AP50"] - accuracy["onnxruntime fp32"]["AP50"])
    print(
        f"INT8 vs FP32: mAP@0.5 {change:+.2f} points, {base / timings['onnxruntime int8'].median_ms:.2f}x faster"
    )
    results = {
        "model": str(args.model),
        "accuracy": accuracy,
        "timings_ms": {name: vars(t) for name, t in timings.items()},
        "quantization": report_dict(quantization),
        "threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'} (and fp32.onnx, int8.onnx)")


if __name__ == "__main__":
    main()
