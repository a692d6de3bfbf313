"""Speed measurement: latency per image split into preprocessing / network / post-processing,
throughput per batch size, peak memory, and the network's GFLOP/s set against the machine's own
convolution throughput measured in the same run.

Every figure is the median over repeated runs after warm-up, with its spread. The reference is
one 3x3 conv, 256 -> 256 channels at 40x40 (the size of M2Det320's largest pyramid level), at
the same batch, threads, dtype and memory format; its runs are interleaved with the network's,
so both see the same machine load (with ONNX Runtime or OpenVINO, the reference runs just before the network
instead, as two thread pools interleaved on few cores slow each other). Post-processing runs on a realistic load: predictions
synthesised so that a stated number of (anchor, class) scores pass the threshold, clustered
around objects as a trained detector's are (`m2det.boxes.synthesize`; or, on request, the network's
own output). The stopwatch is `m2det.utils.timing`'s, the memory probe `m2det.utils.memory`'s.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from m2det.boxes.synthesize import synthesize_predictions
from m2det.deploy.optimize import autocast
from m2det.device import resolve_device
from m2det.errors import M2DetError
from m2det.inference.network import BACKENDS, Network
from m2det.inference.pipeline import DetectionPipeline
from m2det.utils.machine import cpu_model, present_speed_flags
from m2det.utils.memory import PeakMemory
from m2det.utils.timing import Stopwatch

REFERENCE_CONV = {"in_channels": 256, "out_channels": 256, "kernel": 3, "size": 40}
# Pause between the timing blocks of two runtimes, long enough for a thread pool to stop spinning.
SETTLE_S = 1.0


@dataclass
class BenchSettings:
    """What `run_bench` measures.

    `model`: a preset name (random weights: fine for speed; post-processing then runs on the
    synthesised load), our `.safetensors` file, an `.onnx` file (backend onnxruntime) or an OpenVINO
    `.xml` IR (backend openvino; a preset or `.safetensors` with backend openvino is converted).
    `optimize` applies `m2det.deploy.optimize_for_inference` (PyTorch backend) with the given
    overrides (None: its defaults). `postprocess_load`: "synthetic" (exactly
    `boxes_above_threshold` scores above the threshold) or "model" (the network's own output on
    `image`, meaningful for trained weights).
    """

    model: str = "m2det320_vgg16"
    input_size: Optional[int] = None
    num_classes: Optional[int] = None
    device: str = "cpu"
    backend: str = "pytorch"
    threads: Optional[int] = None
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 2
    repeats: int = 10
    optimize: bool = True
    channels_last: Optional[bool] = None
    compile: Optional[bool] = None
    precision: str = "fp32"
    postprocess: str = "paper"
    postprocess_load: str = "synthetic"
    boxes_above_threshold: int = 1000
    image: Optional[str] = None
    image_size: tuple[int, int] = (480, 640)  # (H, W) of the synthetic image when no `image`
    reference: bool = True
    seed: int = 0


# ----- the reference convolution -----
def reference_conv(
    batch: int, device: torch.device, dtype: Optional[torch.dtype], channels_last: bool
) -> tuple[Callable[[], Tensor], float]:
    """The reference 3x3 conv as a callable at `batch`, and its GFLOPs (2 x multiply-accumulates)."""
    c_in, c_out, k, s = (REFERENCE_CONV[key] for key in ("in_channels", "out_channels", "kernel", "size"))
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False).to(device).eval().requires_grad_(False)
    x = torch.randn(batch, c_in, s, s, device=device)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    gflops = 2 * c_in * c_out * k * k * s * s * batch / 1e9

    def run() -> Tensor:
        with torch.inference_mode(), autocast(device, dtype):
            return conv(x)

    return run, gflops


# ----- the measurement -----
def _load(settings: BenchSettings, device: torch.device) -> tuple[Network, Callable[[Tensor], Any], dict]:
    """The network (a `m2det.inference.Network`: the seam every runtime implements), the callable
    that is timed, and what it is."""
    path = Path(settings.model)
    if settings.backend not in BACKENDS:
        raise M2DetError(f"backend must be one of {BACKENDS}, got {settings.backend!r}")
    if path.suffix in (".onnx", ".xml"):  # an exported file runs on its own runtime
        from m2det.inference.network import check_backend_choice, load_network

        check_backend_choice(settings.backend, path)
        exported: Any = load_network(path, threads=settings.threads, backend=settings.backend)
        kind = "onnx" if path.suffix == ".onnx" else "openvino"
        quantization = exported.metadata.get("m2det.quantization")
        return exported, exported.forward_raw, {kind: str(path), "quantization": quantization}
    model = bench_model(settings.model, settings.num_classes).to(device).eval()
    if settings.backend == "openvino":
        from m2det.deploy.export import openvino_model
        from m2det.deploy.openvino_backend import OpenVinoNetwork

        ov_network = OpenVinoNetwork(
            openvino_model(model.cpu(), settings.input_size), threads=settings.threads
        )
        return ov_network, ov_network.forward_raw, {"openvino": "converted for this run (FP32)"}
    if settings.backend == "onnxruntime":
        from m2det.deploy.export import export_onnx
        from m2det.deploy.onnx_backend import OnnxRuntimeNetwork

        with tempfile.TemporaryDirectory(prefix="m2det-bench-") as tmp:
            export_onnx(model.cpu(), Path(tmp) / "model.onnx", input_size=settings.input_size)
            onnx_network = OnnxRuntimeNetwork(Path(tmp) / "model.onnx", threads=settings.threads)
        return onnx_network, onnx_network.forward_raw, {"onnx": "exported for this run (FP32)"}
    if not settings.optimize:

        def eager(x: Tensor) -> tuple[Tensor, Tensor]:
            with torch.inference_mode():  # as the fast path runs, so that only the options differ
                return model.forward_raw(x)

        return model, eager, {"optimized": False}
    from m2det.deploy import optimize_for_inference

    fast = optimize_for_inference(
        model, channels_last=settings.channels_last, compile=settings.compile, precision=settings.precision
    )
    return fast, fast.forward_raw, {"optimized": True, **fast.options.to_dict()}


def bench_model(model: str, num_classes: Optional[int] = None) -> Any:
    """The PyTorch M2Det to measure: a preset's (random weights, `num_classes` if given) or our
    `.safetensors` file's."""
    from m2det.models import build_model
    from m2det.models.loading import load_model

    path = Path(model)
    if path.suffix == ".safetensors":
        return load_model(path)
    if path.suffix in (".pth", ".pt", ".onnx", ".xml") or os.sep in model:
        raise M2DetError(
            "model: expected a preset name, our .safetensors file or an export (.onnx, OpenVINO .xml), "
            f"got {model!r}"
        )
    overrides: dict[str, Any] = {"backbone.weights": None}
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return build_model(model, **overrides)


def _test_image(settings: BenchSettings) -> Tensor:
    """The image that preprocessing starts from: uint8 RGB CHW, as decoded from a file."""
    if settings.image is not None:
        from m2det.io.image import read_image

        return read_image(settings.image)
    h, w = settings.image_size
    return torch.randint(
        0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(settings.seed)
    )


def run_bench(settings: BenchSettings, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure as `BenchSettings` says; returns the JSON-ready result (see docs/deploy.md).

    `settings.threads` holds for the measurement only: torch's thread count is process-wide, so it
    is restored afterwards, also on an error, for whatever the caller runs next.
    """
    previous_threads = torch.get_num_threads()
    try:
        return _measure(settings, log)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(settings: BenchSettings, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure as `BenchSettings` says; returns the JSON-ready result (see docs/deploy.md)."""
    from m2det.models.complexity import measure

    if settings.repeats < 1 or settings.warmup < 0:
        raise M2DetError(
            f"repeats must be >= 1 and warmup >= 0, got {settings.repeats} and {settings.warmup}"
        )
    if not settings.batch_sizes or min(settings.batch_sizes) < 1:
        raise M2DetError(f"batch sizes must be >= 1, got {settings.batch_sizes}")
    if settings.postprocess_load not in ("synthetic", "model"):
        raise M2DetError(f"postprocess_load must be synthetic or model, got {settings.postprocess_load!r}")
    device = resolve_device(settings.device)
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    started = time.time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    log(f"loading {settings.model} ({settings.backend})")
    runtime, network, backend_info = _load(settings, device)
    pipeline = DetectionPipeline(runtime, settings.postprocess)
    memory = PeakMemory(device)
    size = int(settings.input_size or runtime.input_size)
    pipeline.check_size(size)
    config = runtime.config
    complexity = measure(config, size)
    timer = Stopwatch(device)
    options = backend_info if settings.backend == "pytorch" else {}
    # ONNX Runtime and OpenVINO run convolutions in blocked layouts, closest to channels-last
    channels_last = bool(options.get("channels_last", False)) or settings.backend != "pytorch"
    ref_dtype = (
        {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.precision)
        if settings.backend == "pytorch"
        else None
    )

    # latency per image at batch 1: preprocessing, network, post-processing
    image = _test_image(settings).to(device)
    post = pipeline.postprocessor
    anchors = pipeline.anchors(size).to(device)
    x, sizes = pipeline.preprocess([image], size)
    log("latency at batch 1")
    pre_t = timer.repeat(lambda: pipeline.preprocess([image], size), settings.warmup, settings.repeats)
    net_t = timer.repeat(lambda: network(x), settings.warmup, settings.repeats)
    if settings.postprocess_load == "synthetic":
        loc, logits = synthesize_predictions(
            anchors.cpu(), config.num_classes, settings.boxes_above_threshold, post.settings.score_threshold,
            post.box_coder, seed=settings.seed,
        )  # fmt: skip
        loc, logits = loc.to(device), logits.to(device)
    else:
        loc, logits = network(x)
    above = int((logits.float().softmax(-1)[..., 1:] > post.settings.score_threshold).sum())
    with torch.inference_mode():
        post_t = timer.repeat(lambda: post(loc, logits, anchors, sizes), settings.warmup, settings.repeats)
        kept = int(post(loc, logits, anchors, sizes)[0]["scores"].numel())

    throughput = []
    for batch in sorted(set(settings.batch_sizes)):
        log(f"throughput at batch {batch}")
        xb = x.expand(batch, -1, -1, -1).contiguous()
        ref_run, ref_gflops = (
            reference_conv(batch, device, ref_dtype, channels_last) if settings.reference else (None, 0.0)
        )
        memory.reset()
        for _ in range(max(1, settings.warmup)):
            network(xb)
        peak = memory.peak_mb()
        fns: dict[str, Callable[[], Any]] = {"network": functools.partial(network, xb)}
        if ref_run is not None:
            ref_run()
            fns["reference"] = ref_run
        if settings.backend == "pytorch":
            timings = timer.interleaved(fns, settings.repeats, calls={"reference": 3})
        else:
            # Back to back, not interleaved: each runtime's thread pool keeps spinning for a while
            # after a call and would take the cores from the other's next call; a pause lets it sleep.
            timings = {}
            for name in sorted(fns, key=lambda name: name != "reference"):
                time.sleep(SETTLE_S)
                timings[name] = timer.repeat(fns[name], max(1, settings.warmup), settings.repeats)
        t = timings["network"]
        row: dict[str, Any] = {
            "batch": batch,
            "network": asdict(t),
            "images_per_s": batch / (t.median_ms / 1e3),
            "network_gflops_per_s": complexity.gflops * batch / (t.median_ms / 1e3),
            "peak_memory_mb": peak,
        }
        if ref_run is not None:
            ref = timings["reference"]
            ref_rate = ref_gflops / (ref.median_ms / 1e3)
            row["reference_conv"] = {**asdict(ref), "gflops_per_s": ref_rate}
            row["fraction_of_reference"] = row["network_gflops_per_s"] / ref_rate
        throughput.append(row)

    total = pre_t.median_ms + net_t.median_ms + post_t.median_ms
    return {
        "model": settings.model,
        "config_name": config.name,
        "input_size": size,
        "num_classes": config.num_classes,
        "device": str(device),
        "backend": settings.backend,
        "backend_info": backend_info,
        "precision": _precision(settings, backend_info),
        "threads": torch.get_num_threads() if settings.threads is None else int(settings.threads),
        "params": complexity.params,
        "gflops_per_image": complexity.gflops,
        "latency_batch1": {
            "preprocess": asdict(pre_t),
            "network": asdict(net_t),
            "postprocess": asdict(post_t),
            "total_median_ms": total,
            "postprocess_fraction_of_network": post_t.median_ms / net_t.median_ms,
            "image_size_hw": list(image.shape[-2:]),
        },
        "postprocess_load": {
            "source": settings.postprocess_load,
            "settings": settings.postprocess,
            "score_threshold": post.settings.score_threshold,
            "nms": post.settings.nms,
            "boxes_above_threshold": above,
            "detections_kept": kept,
        },
        "throughput": throughput,
        "reference_conv": {
            **REFERENCE_CONV,
            "what": "one 3x3 conv (PyTorch) at each batch size, same threads/dtype/memory format, runs interleaved with the network's (PyTorch) or just before them (ONNX Runtime, OpenVINO)",
            "channels_last": channels_last,
            "dtype": str(ref_dtype or torch.float32).removeprefix("torch."),
        },
        "peak_memory_method": memory.method,
        "settings": {
            **asdict(settings),
            "batch_sizes": list(settings.batch_sizes),
            "image_size": list(settings.image_size),
        },
        "environment": environment(load_before, started),
    }


def _precision(settings: BenchSettings, backend_info: dict[str, Any]) -> str:
    if settings.backend == "pytorch":
        return settings.precision
    return "int8" if backend_info.get("quantization") else "fp32"


def environment(load_before: Optional[tuple[float, float, float]], started: float) -> dict[str, Any]:
    """What a speed figure depends on: versions, the CPU and its vector extensions, the machine's
    load average before and after the run (`load_before`), the seconds since `started`."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_flags": present_speed_flags(),
        "cpu_count": os.cpu_count(),
        "seconds": time.time() - started,
    }
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    with contextlib.suppress(ImportError):
        import openvino

        info["openvino"] = openvino.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if load_before is not None:
        info["load_average_before"] = list(load_before)
        info["load_average_after"] = list(os.getloadavg())
    return info


__all__ = ["BenchSettings", "bench_model", "environment", "reference_conv", "run_bench"]
