"""Speed measurement: latency per image split into preprocessing / network / post-processing,
throughput per batch size, peak memory, and the network's GFLOP/s set against the machine's own
convolution throughput measured in the same run.

Every figure is the median over repeated runs after warm-up, with its spread. The reference is
one 3x3 conv, 256 -> 256 channels at 40x40 (the size of M2Det320's largest pyramid level), at
the same batch, threads, dtype and memory format; its runs are interleaved with the network's,
so both see the same machine load (with ONNX Runtime, the reference runs just before the network
instead, as two thread pools interleaved on few cores slow each other). Post-processing runs on a realistic load: predictions
synthesised so that a stated number of (anchor, class) scores pass the threshold, clustered
around objects as a trained detector's are (or, on request, the network's own output).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou

from m2det.boxes.coder import BoxCoder
from m2det.deploy.optimize import autocast
from m2det.device import resolve_device
from m2det.inference.network import BACKENDS, Network
from m2det.inference.pipeline import DetectionPipeline

REFERENCE_CONV = {"in_channels": 256, "out_channels": 256, "kernel": 3, "size": 40}
# Pause between the timing blocks of two runtimes, long enough for a thread pool to stop spinning.
SETTLE_S = 1.0
BACKGROUND_LOGIT = 0.0
SUPPRESSED_LOGIT = -12.0  # a foreground logit whose probability stays far below any threshold


@dataclass
class BenchSettings:
    """What `run_bench` measures.

    `model`: a preset name (random weights: fine for speed; post-processing then runs on the
    synthesised load), our `.safetensors` file, or an `.onnx` file (backend onnxruntime).
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


@dataclass
class Timing:
    """Wall-clock times of repeated runs, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    max_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        ms = sorted(s * 1e3 for s in seconds)
        quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
        return cls(statistics.median(ms), quartiles[0], quartiles[2], ms[0], ms[-1], len(ms))


class Stopwatch:
    """Times a callable, synchronising CUDA so the GPU's work is inside the interval."""

    def __init__(self, device: torch.device):
        self.sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def repeat(self, fn: Callable[[], Any], warmup: int, repeats: int) -> Timing:
        for _ in range(warmup):
            fn()
        return Timing.of([self(fn) for _ in range(repeats)])

    def interleaved(
        self, fns: dict[str, Callable[[], Any]], repeats: int, calls: Optional[dict[str, int]] = None
    ) -> dict[str, Timing]:
        """Each callable once per round for `repeats` rounds, so that a change in the machine's load
        hits all alike; `calls[name]` runs a short one that many times per round (its time is per call)."""
        calls = calls or {}
        seconds: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                n = calls.get(name, 1)
                seconds[name].append(self(lambda fn=fn, n=n: [fn() for _ in range(n)]) / n)
        return {name: Timing.of(values) for name, values in seconds.items()}


# ----- peak memory -----
class PeakMemory:
    """Peak memory of what runs between `reset()` and `peak_mb()`, above the memory in use at `reset()`.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only, the allocator's cache excluded).
    CPU on Linux: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs);
    `reset()` first hands the C allocator's free memory back to the system (glibc `malloc_trim`),
    else memory freed earlier (e.g. by the previous batch size) would be reused unseen.
    Elsewhere: `getrusage` ru_maxrss, a peak over the process's whole life (a lower bound).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._trim = _malloc_trim()
        self.resettable = device.type == "cpu" and _can_reset_peak_rss()
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated minus the memory allocated before the runs"
        elif self.resettable:
            self.method = (
                "peak resident set size during the runs (Linux VmHWM, reset via /proc/self/clear_refs) minus the "
                "resident set just before them"
                + (", after glibc malloc_trim(0) returned freed memory to the system" if self._trim else "")
            )
        else:
            self.method = (
                "getrusage ru_maxrss (peak over the process's life, a lower bound) minus the resident set"
            )
        self.baseline_mb = 0.0

    def _current_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _proc_status_mb("VmRSS") if self.resettable else _maxrss_mb()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._trim is not None:
            self._trim(0)
        self.baseline_mb = self._current_mb()
        if self.resettable:
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline_mb
        peak = _proc_status_mb("VmHWM") if self.resettable else _maxrss_mb()
        return peak - self.baseline_mb


def _malloc_trim() -> Optional[Callable[[int], int]]:
    if platform.system() != "Linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


def _can_reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_mb("VmHWM") > 0
    except OSError:
        return False


def _proc_status_mb(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"/proc/self/status has no {field_name}")


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024  # bytes on macOS, kB on Linux


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


# ----- a realistic post-processing load -----
def synthesize_predictions(
    anchors: Tensor,
    num_classes: int,
    num_above: int,
    score_threshold: float,
    box_coder: BoxCoder,
    anchors_per_object: int = 25,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """`(loc [1, A, 4], logits [1, A, C])` in which exactly `num_above` (anchor, class) pairs score
    above `score_threshold`, as a trained detector's output looks: the anchors that overlap a few
    random objects most each predict that object's box (jittered) and class; every other score is
    far below the threshold."""
    num_anchors = anchors.shape[0]
    if not 0 <= num_above <= num_anchors:
        raise ValueError(
            f"boxes above the threshold must be in [0, {num_anchors}] (the anchors), got {num_above}"
        )
    g = torch.Generator().manual_seed(seed)
    num_objects = max(1, math.ceil(num_above / anchors_per_object))
    centres = 0.1 + 0.8 * torch.rand(num_objects, 2, generator=g)
    sides = 0.05 + 0.35 * torch.rand(num_objects, 2, generator=g)
    objects = torch.cat([centres - sides / 2, centres + sides / 2], dim=1).clamp(0, 1)
    labels = torch.randint(1, num_classes, (num_objects,), generator=g)
    best_iou, best_object = box_iou(objects, box_convert(anchors, "cxcywh", "xyxy")).max(dim=0)
    chosen = best_iou.topk(num_above).indices
    owner = best_object[chosen]

    logits = torch.full((num_anchors, num_classes), SUPPRESSED_LOGIT)
    logits[:, 0] = BACKGROUND_LOGIT
    # a probability p for the owner's class, with background at 0 and the rest suppressed, needs
    # the logit log(p * rest / (1 - p)), rest = the other classes' exp-sum
    p = score_threshold + 0.01 + (0.95 - score_threshold - 0.01) * torch.rand(num_above, generator=g)
    rest = math.exp(BACKGROUND_LOGIT) + (num_classes - 2) * math.exp(SUPPRESSED_LOGIT)
    logits[chosen, labels[owner]] = torch.log(p * rest / (1 - p))

    loc = torch.zeros(num_anchors, 4)
    jitter = 0.02 * torch.randn(num_above, 4, generator=g)
    targets = (objects[owner] + jitter).clamp(0, 1)
    targets = torch.cat([targets[:, :2], torch.maximum(targets[:, 2:], targets[:, :2] + 0.01)], dim=1)
    loc[chosen] = box_coder.encode(targets, anchors[chosen])
    found = int((logits.softmax(-1)[:, 1:] > score_threshold).sum())
    if found != num_above:
        raise RuntimeError(f"synthesised {found} scores above the threshold instead of {num_above}")
    return loc[None], logits[None]


# ----- the measurement -----
def _load(settings: BenchSettings, device: torch.device) -> tuple[Network, Callable[[Tensor], Any], dict]:
    """The network (a `m2det.inference.Network`: the seam every runtime implements), the callable
    that is timed, and what it is."""
    path = Path(settings.model)
    if settings.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {settings.backend!r}")
    if path.suffix == ".onnx":
        if settings.backend != "onnxruntime":
            raise ValueError(f"{path}: an ONNX model runs with backend onnxruntime, not {settings.backend}")
        from m2det.deploy.onnx_backend import OnnxRuntimeNetwork

        onnx_network = OnnxRuntimeNetwork(path, threads=settings.threads)
        quantization = onnx_network.metadata.get("m2det.quantization")
        return onnx_network, onnx_network.forward_raw, {"onnx": str(path), "quantization": quantization}
    model = _torch_model(settings).to(device).eval()
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


def _torch_model(settings: BenchSettings) -> Any:
    from m2det.io.checkpoint import load_model
    from m2det.models import build_model

    path = Path(settings.model)
    if path.suffix == ".safetensors":
        return load_model(path)
    if path.suffix in (".pth", ".pt", ".onnx") or os.sep in settings.model:
        raise ValueError(
            f"model: expected a preset name, our .safetensors file or an .onnx export, got {settings.model!r}"
        )
    overrides: dict[str, Any] = {"backbone.weights": None}
    if settings.num_classes is not None:
        overrides["num_classes"] = settings.num_classes
    return build_model(settings.model, **overrides)


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
    """Measure as `BenchSettings` says; returns the JSON-ready result (see docs/deploy.md)."""
    from m2det.models.complexity import measure

    if settings.repeats < 1 or settings.warmup < 0:
        raise ValueError(
            f"repeats must be >= 1 and warmup >= 0, got {settings.repeats} and {settings.warmup}"
        )
    if not settings.batch_sizes or min(settings.batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {settings.batch_sizes}")
    if settings.postprocess_load not in ("synthetic", "model"):
        raise ValueError(f"postprocess_load must be synthetic or model, got {settings.postprocess_load!r}")
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
    channels_last = bool(options.get("channels_last", False)) or settings.backend == "onnxruntime"
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
        fns = {"network": lambda xb=xb: network(xb)}
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
            "what": "one 3x3 conv (PyTorch) at each batch size, same threads/dtype/memory format, runs interleaved with the network's (PyTorch) or just before them (ONNX Runtime)",
            "channels_last": channels_last,
            "dtype": str(ref_dtype or torch.float32).removeprefix("torch."),
        },
        "peak_memory_method": memory.method,
        "settings": {
            **asdict(settings),
            "batch_sizes": list(settings.batch_sizes),
            "image_size": list(settings.image_size),
        },
        "environment": _environment(load_before, started),
    }


def _precision(settings: BenchSettings, backend_info: dict[str, Any]) -> str:
    if settings.backend == "pytorch":
        return settings.precision
    return "int8" if backend_info.get("quantization") else "fp32"


def _environment(load_before: Optional[tuple[float, float, float]], started: float) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "seconds": time.time() - started,
    }
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if load_before is not None:
        info["load_average_before"] = list(load_before)
        info["load_average_after"] = list(os.getloadavg())
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


__all__ = [
    "BenchSettings",
    "PeakMemory",
    "Timing",
    "reference_conv",
    "run_bench",
    "synthesize_predictions",
]
