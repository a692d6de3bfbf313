"""Every runtime and precision of one model, measured in one run on this machine: which to deploy.

`m2det bench --backends all` takes one model (a preset with random weights, or our `.safetensors`
file), builds each installed runtime from the same weights (PyTorch eager, the fast path and its
Winograd and bf16 variants, ONNX Runtime and OpenVINO in FP32 and INT8) and measures the network's
time per batch. The runtimes take turns in mirrored rounds (A B C, C B A, ...), with a pause before
each call so that the previous runtime's thread pool stops spinning first, so that drift in the
machine's load falls on all alike. Each row gets its median and spread, its speed relative to a
baseline row (eager PyTorch by default), how far its raw outputs are from eager PyTorch's, and,
given a data set, its mAP@0.5 and COCO AP by `m2det.engine.evaluate.evaluate` with the change
against FP32 PyTorch. INT8 rows are calibrated on `calib_data` (default: the data set; without
either, on random images: then their speed is meaningful, their accuracy is not).

The stopwatch and the timing summary are `m2det.utils.timing`'s, as `m2det.engine.bench` uses them.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from m2det.classes import class_mismatch
from m2det.deploy.calibration import CalibrationImages
from m2det.deploy.prepack import prepack_available
from m2det.device import cpu_supports_bf16
from m2det.engine.bench import SETTLE_S, bench_model, environment
from m2det.errors import ConfigError, M2DetError
from m2det.inference.network import BACKENDS, Network
from m2det.io.atomic import atomic_path
from m2det.io.jsonfile import write_json
from m2det.utils.timing import Stopwatch


@dataclass(frozen=True)
class RuntimeSpec:
    """One row of the comparison: a runtime at one precision."""

    key: str
    label: str
    backend: str
    precision: str


RUNTIMES = (
    RuntimeSpec("pytorch-eager", "PyTorch eager (no_grad)", "pytorch", "fp32"),
    RuntimeSpec("pytorch-fast", "PyTorch fast path", "pytorch", "fp32"),
    RuntimeSpec("pytorch-winograd", "PyTorch fast path", "pytorch", "winograd"),
    RuntimeSpec("pytorch-bf16", "PyTorch fast path", "pytorch", "bf16"),
    RuntimeSpec("onnxruntime-fp32", "ONNX Runtime", "onnxruntime", "fp32"),
    RuntimeSpec("onnxruntime-int8", "ONNX Runtime", "onnxruntime", "int8"),
    RuntimeSpec("openvino-fp32", "OpenVINO", "openvino", "fp32"),
    RuntimeSpec("openvino-int8", "OpenVINO", "openvino", "int8"),
)
DEFAULT_BASELINE = "pytorch-eager"
# What each backend needs beyond m2det's own dependencies, and the extra that installs it.
REQUIREMENTS = {
    "onnxruntime": (("onnx", "onnxscript", "onnxruntime"), "export"),
    "openvino": (("openvino",), "openvino"),
}
INT8_REQUIREMENTS = {"openvino": ("nncf",)}


@dataclass
class RuntimeBenchSettings:
    """What `run_runtime_bench` measures.

    `model`: a preset name (random weights) or our `.safetensors` file. `backends`: any of
    `m2det.inference.network.BACKENDS`. `repeats`: timed rounds (each runtime once per round) per
    batch size, after `warmup` untimed calls each; `settle_s`: the pause before each call.
    `baseline`: the row key that speeds are relative to (default: eager PyTorch, else the first row).
    `data`/`split`: score each runtime there (`max_images`: the first N). INT8 calibration:
    `calib_num` images of `calib_data`/`calib_split` (default: `data`), else of random images.
    """

    model: str = "m2det320_vgg16"
    input_size: Optional[int] = None
    num_classes: Optional[int] = None
    backends: tuple[str, ...] = BACKENDS
    int8: bool = True
    threads: Optional[int] = None
    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 2
    repeats: int = 10
    settle_s: float = SETTLE_S
    baseline: Optional[str] = None
    data: Optional[str] = None
    split: str = "val"
    max_images: Optional[int] = None
    eval_batch: int = 8
    postprocess: str = "paper"
    calib_data: Optional[str] = None
    calib_split: str = "train"
    calib_num: int = 300
    float_heads: bool = False
    seed: int = 0


def parse_backends(value: str) -> tuple[str, ...]:
    """`all` or a comma-separated list of backends -> the backends, checked."""
    if value.strip() == "all":
        return BACKENDS
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in BACKENDS]
    if not names or unknown:
        raise M2DetError(f"--backends: expected all or a comma-separated list of {BACKENDS}, got {value!r}")
    return names


def unavailable(spec: RuntimeSpec, int8: bool) -> Optional[str]:
    """Why `spec` cannot run here (a missing package, a CPU feature, INT8 switched off), or None."""
    if spec.precision == "int8" and not int8:
        return "skipped: INT8 switched off (--no-int8)"
    if spec.precision == "bf16" and not cpu_supports_bf16():
        return "skipped: CPU lacks AVX512-BF16 / AMX-BF16"
    if spec.precision == "winograd" and not prepack_available(torch.device("cpu")):
        return "skipped: this torch has no oneDNN (the fast path's direct convs)"
    packages, extra = REQUIREMENTS.get(spec.backend, ((), ""))
    if spec.precision == "int8":
        packages = packages + INT8_REQUIREMENTS.get(spec.backend, ())
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        return f'skipped: {", ".join(missing)} not installed (pip install "m2det[{extra}]")'
    return None


@dataclass
class PreparedRuntime:
    network: Network
    call: Callable[[Tensor], Any]
    size_mb: float
    note: str = ""


class _NoiseImages(torch.utils.data.Dataset):
    """Random uint8 images (with no targets): INT8 calibration when no data set is given."""

    def __init__(self, count: int, size: int, seed: int):
        self.count, self.size, self.seed = count, size, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Tensor, None]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        return torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8, generator=generator), None


@dataclass
class RuntimeContext:
    """What the rows share: the PyTorch model, the input size, a folder for exports, calibration."""

    model: Any
    size: int
    folder: Path
    settings: RuntimeBenchSettings
    threads: int
    _calibration: Optional[tuple[CalibrationImages, str]] = None
    _onnx_fp32: Optional[Path] = None
    _openvino_fp32: Any = None

    def calibration(self) -> tuple[CalibrationImages, str]:
        """The calibration images and a description of them, made once."""
        if self._calibration is None:
            s = self.settings
            source = s.calib_data or s.data
            if source is not None:
                from m2det.deploy.calibration import dataset_calibration_images

                images = dataset_calibration_images(
                    self.model.config, self.size, source, s.calib_split, s.calib_num, s.seed
                )
                self._calibration = images, f"{len(images)} images of {source} ({s.calib_split})"
            else:
                from functools import partial

                from m2det.models.transform import normalize, pixel_means_tensor

                means = pixel_means_tensor(self.model.config.pixel_means)
                noise = _NoiseImages(s.calib_num, self.size, s.seed)
                images = CalibrationImages(noise, partial(normalize, pixel_means=means), s.calib_num, s.seed)
                self._calibration = images, f"{len(images)} random images (speed only: no data given)"
        return self._calibration

    def onnx_fp32(self) -> Path:
        if self._onnx_fp32 is None:
            from m2det.deploy.export import export_onnx

            path = self.folder / "fp32.onnx"
            export_onnx(self.model, path, input_size=self.size, check=False)
            self._onnx_fp32 = path
        return self._onnx_fp32

    def openvino_fp32(self) -> Any:
        if self._openvino_fp32 is None:
            from m2det.deploy.export import openvino_model

            self._openvino_fp32 = openvino_model(self.model, self.size)
        return self._openvino_fp32


def _file_mb(*paths: Path) -> float:
    return sum(path.stat().st_size for path in paths) / 1e6


def prepare_runtime(spec: RuntimeSpec, ctx: RuntimeContext) -> PreparedRuntime:
    """Build `spec`'s runtime from the shared model."""
    model = ctx.model
    if spec.backend == "pytorch":
        weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
        if spec.key == "pytorch-eager":

            def eager(x: Tensor) -> tuple[Tensor, Tensor]:
                with torch.no_grad():  # as the authors' test script runs it
                    return model.forward_raw(x)

            return PreparedRuntime(model, eager, weights_mb)
        from m2det.deploy import optimize_for_inference

        fast = optimize_for_inference(model, precision=spec.precision)
        return PreparedRuntime(fast, fast.forward_raw, weights_mb)
    if spec.backend == "onnxruntime":
        from m2det.deploy.onnx_backend import OnnxRuntimeNetwork

        fp32 = ctx.onnx_fp32()
        if spec.precision == "fp32":
            network = OnnxRuntimeNetwork(fp32, threads=ctx.threads)
            return PreparedRuntime(network, network.forward_raw, _file_mb(fp32))
        from m2det.deploy.quantize import DatasetCalibrationReader, quantize_onnx

        images, described = ctx.calibration()
        reader = DatasetCalibrationReader(images.dataset, images.normalize, len(images), ctx.settings.seed)
        path = ctx.folder / "int8.onnx"
        quantize_onnx(fp32, path, reader, source=described, float_heads=ctx.settings.float_heads)
        network = OnnxRuntimeNetwork(path, threads=ctx.threads)
        return PreparedRuntime(network, network.forward_raw, _file_mb(path), f"calibrated on {described}")
    if spec.backend == "openvino":
        from m2det.deploy.openvino_backend import OpenVinoNetwork, save_openvino

        converted = ctx.openvino_fp32()
        note = ""
        if spec.precision == "int8":
            from m2det.deploy.openvino_quantize import quantize_openvino

            images, described = ctx.calibration()
            converted, _ = quantize_openvino(
                converted, images, source=described, float_heads=ctx.settings.float_heads
            )
            note = f"calibrated on {described}"
        path = save_openvino(converted, ctx.folder / f"{spec.precision}.xml")
        ov_network = OpenVinoNetwork(path, threads=ctx.threads)
        return PreparedRuntime(
            ov_network, ov_network.forward_raw, _file_mb(path, path.with_suffix(".bin")), note
        )
    raise M2DetError(f"no runtime for backend {spec.backend!r}")


def _relative_difference(got: tuple[Tensor, Tensor], expected: tuple[Tensor, Tensor]) -> dict[str, float]:
    """Largest difference of `loc` and `logits` from eager PyTorch's, relative to the largest value."""
    result = {}
    for name, a, b in zip(("loc", "logits"), got, expected):
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        result[name] = float((a - b).abs().max()) / max(float(b.abs().max()), 1.0)
    return result


def _check(settings: RuntimeBenchSettings) -> None:
    if settings.repeats < 1 or settings.warmup < 0:
        raise ConfigError(
            f"repeats must be >= 1 and warmup >= 0, got {settings.repeats} and {settings.warmup}"
        )
    if not settings.batch_sizes or min(settings.batch_sizes) < 1:
        raise ConfigError(f"batch sizes must be >= 1, got {settings.batch_sizes}")
    if settings.settle_s < 0:
        raise ConfigError(f"settle_s must be >= 0, got {settings.settle_s}")
    if settings.calib_num < 1:
        raise ConfigError(f"calib_num must be >= 1, got {settings.calib_num}")
    unknown = [name for name in settings.backends if name not in BACKENDS]
    if unknown or not settings.backends:
        raise ConfigError(f"backends must be among {BACKENDS}, got {settings.backends}")
    keys = [spec.key for spec in RUNTIMES]
    if settings.baseline is not None and settings.baseline not in keys:
        raise ConfigError(f"baseline must be one of {keys}, got {settings.baseline!r}")
    if settings.baseline is not None:  # before anything is built: the measurement would be for nothing
        spec = next(spec for spec in RUNTIMES if spec.key == settings.baseline)
        reason = (
            f"its backend {spec.backend} is not among {list(settings.backends)}"
            if spec.backend not in settings.backends
            else unavailable(spec, settings.int8)
        )
        if reason is not None:
            raise ConfigError(f"baseline {settings.baseline} is not measured: {reason}")


def run_runtime_bench(
    settings: RuntimeBenchSettings, log: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Measure every runtime `settings` selects (see the module docstring); returns the JSON-ready
    result. torch's thread count is restored afterwards, as `run_bench` does."""
    _check(settings)
    previous_threads = torch.get_num_threads()
    try:
        if settings.threads:
            torch.set_num_threads(int(settings.threads))
        with tempfile.TemporaryDirectory(prefix="m2det-bench-runtimes-") as tmp:
            return _measure(settings, Path(tmp), log)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(settings: RuntimeBenchSettings, folder: Path, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    model = bench_model(settings.model, settings.num_classes).cpu().eval()
    size = int(settings.input_size or model.config.input_size)
    threads = torch.get_num_threads()
    ctx = RuntimeContext(model, size, folder, settings, threads)
    dataset = None
    if settings.data is not None:
        from m2det.data import build_dataset

        dataset = build_dataset(settings.data, settings.split, keep_ignored=True)
        # before the long measurement, not after it: scoring needs the model's classes
        problem = class_mismatch(model.config.num_classes - 1, dataset.class_names, "the model", "--data")
        if problem:
            raise M2DetError(f"{problem}: give --num-classes or a model trained on that data")

    x1 = model.normalize(torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(settings.seed)))
    with torch.no_grad():
        expected = model.forward_raw(x1)

    rows: list[dict[str, Any]] = []
    prepared: dict[str, PreparedRuntime] = {}
    for spec in RUNTIMES:
        if spec.backend not in settings.backends:
            continue
        row: dict[str, Any] = {"key": spec.key, "runtime": spec.label, **asdict(spec)}
        del row["label"]
        reason = unavailable(spec, settings.int8)
        if reason is not None:
            rows.append({**row, "status": "skipped", "note": reason})
            continue
        log(f"preparing {spec.key}")
        start = time.perf_counter()
        try:
            ready = prepare_runtime(spec, ctx)
        except M2DetError:
            raise  # the user's input (data, calibration source): the same for every row
        except Exception as exc:  # a runtime that fails here is reported, the others still measured
            rows.append({**row, "status": "failed", "note": f"{type(exc).__name__}: {exc}"})
            continue
        prepared[spec.key] = ready
        rows.append(
            {
                **row,
                "status": "ok",
                "note": ready.note,
                "size_mb": ready.size_mb,
                "prepare_s": time.perf_counter() - start,
                "difference_from_eager": _relative_difference(ready.call(x1), expected),
            }
        )
    if not prepared:
        raise M2DetError(
            "no runtime could be measured: " + "; ".join(f"{r['key']} {r['note']}" for r in rows)
        )
    baseline = settings.baseline or (
        DEFAULT_BASELINE if DEFAULT_BASELINE in prepared else next(iter(prepared))
    )
    if baseline not in prepared:  # it failed to build
        raise M2DetError(f"baseline {baseline} could not be measured: {_row(rows, baseline)['note']}")

    by_key = {row["key"]: row for row in rows}
    for batch in sorted(set(settings.batch_sizes)):
        log(f"timing batch {batch}: {settings.repeats} rounds of {len(prepared)} runtimes")
        xb = x1.expand(batch, -1, -1, -1).contiguous()
        fns: dict[str, Callable[[], Any]] = {
            key: functools.partial(ready.call, xb) for key, ready in prepared.items()
        }
        for fn in fns.values():  # warm-up, one runtime after the other
            time.sleep(settings.settle_s)
            for _ in range(settings.warmup):
                fn()
        timings = Stopwatch(torch.device("cpu")).interleaved(
            fns, settings.repeats, mirrored=True, pause_s=settings.settle_s
        )
        for key, timing in timings.items():
            by_key[key].setdefault("timings", {})[str(batch)] = asdict(timing)
            by_key[key].setdefault("images_per_s", {})[str(batch)] = batch / (timing.median_ms / 1e3)
        for key, timing in timings.items():
            by_key[key].setdefault("speed_vs_baseline", {})[str(batch)] = (
                timings[baseline].median_ms / timing.median_ms
            )

    accuracy_baseline = None
    if dataset is not None:
        from m2det.engine.evaluate import evaluate

        for key, ready in prepared.items():
            log(f"scoring {key} on {settings.data} ({settings.split})")
            result = evaluate(
                ready.network,
                dataset,
                settings=settings.postprocess,
                progress=False,
                batch_size=settings.eval_batch,
                max_images=settings.max_images,
            )
            by_key[key]["accuracy"] = {name: result.metrics[name] for name in ("AP50", "AP", "VOC_AP")}
        accuracy_baseline = next((k for k in ("pytorch-eager", "pytorch-fast") if k in prepared), None)
        if accuracy_baseline is not None:
            reference = by_key[accuracy_baseline]["accuracy"]
            for key in prepared:
                accuracy = by_key[key]["accuracy"]
                by_key[key]["accuracy_change_points"] = {
                    name: 100 * (accuracy[name] - reference[name]) for name in ("AP50", "AP")
                }

    return {
        "model": settings.model,
        "config_name": model.config.name,
        "input_size": size,
        "num_classes": model.config.num_classes,
        "threads": threads,
        "batch_sizes": sorted(set(settings.batch_sizes)),
        "repeats": settings.repeats,
        "baseline": baseline,
        "accuracy_baseline": accuracy_baseline,
        "data": None
        if dataset is None
        else {"data": settings.data, "split": settings.split, "images": _scored_images(dataset, settings)},
        "rows": rows,
        "settings": {
            **asdict(settings),
            "backends": list(settings.backends),
            "batch_sizes": list(settings.batch_sizes),
        },
        "environment": environment(load_before, started),
    }


def _row(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return next((row for row in rows if row["key"] == key), {})


def _scored_images(dataset: Any, settings: RuntimeBenchSettings) -> int:
    return len(dataset) if settings.max_images is None else min(len(dataset), settings.max_images)


# ----- the tables -----
def table_rows(result: dict[str, Any]) -> Iterator[dict[str, str]]:
    """One row of text per runtime, as printed, and written as CSV and Markdown: the median time at
    each batch size, the speed relative to the baseline, accuracy and its change, size, status."""
    batches = result["batch_sizes"]
    for row in result["rows"]:
        ok = row["status"] == "ok"
        cells = {"runtime": row["runtime"], "precision": row["precision"], "status": row["status"]}
        cells["size MB"] = f"{row['size_mb']:.1f}" if ok else ""
        for batch in batches:
            suffix = "" if len(batches) == 1 else f" (batch {batch})"
            timing = row.get("timings", {}).get(str(batch))
            cells[f"median ms{suffix}"] = f"{timing['median_ms']:.1f}" if timing else ""
            cells[f"p25-p75 ms{suffix}"] = f"{timing['p25_ms']:.1f}-{timing['p75_ms']:.1f}" if timing else ""
            speed = row.get("speed_vs_baseline", {}).get(str(batch))
            cells[f"speed vs baseline{suffix}"] = f"{speed:.2f}x" if speed else ""
        if result["data"] is not None:
            accuracy = row.get("accuracy")
            change = row.get("accuracy_change_points")
            cells["mAP@0.5"] = f"{100 * accuracy['AP50']:.2f}" if accuracy else ""
            cells["change (points)"] = f"{change['AP50']:+.2f}" if change else ""
            cells["COCO AP"] = f"{100 * accuracy['AP']:.2f}" if accuracy else ""
        diff = row.get("difference_from_eager")
        cells["max rel. diff"] = f"{max(diff.values()):.1e}" if diff else ""
        cells["note"] = row.get("note", "")
        yield cells


def title(result: dict[str, Any]) -> str:
    env = result["environment"]
    flags = " ".join(env.get("cpu_flags", [])) or "unknown"
    baseline = _row(result["rows"], result["baseline"])
    return (
        f"{result['config_name']} at {result['input_size']}, {result['threads']} threads on {env['cpu']} "
        f"(flags: {flags}); network only, median of {result['repeats']} mirrored rounds; speed relative "
        f"to {baseline.get('runtime', result['baseline'])} {baseline.get('precision', '')}"
    )


def markdown(result: dict[str, Any]) -> str:
    rows = list(table_rows(result))
    columns = list(rows[0]) if rows else []
    lines = [f"{title(result)}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c].replace("|", "/") for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], json_path: Path) -> list[Path]:
    """The result as JSON at `json_path`, and its table as CSV and Markdown beside it, each atomically."""
    json_path = Path(json_path)
    written = [write_json(json_path, result, indent=2)]
    rows = list(table_rows(result))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["runtime"])
    writer.writeheader()
    writer.writerows(rows)
    for suffix, text in ((".csv", buffer.getvalue()), (".md", markdown(result))):
        path = json_path.with_suffix(suffix)
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        written.append(path)
    return written


__all__ = [
    "RUNTIMES",
    "RuntimeBenchSettings",
    "RuntimeSpec",
    "cpu_supports_bf16",
    "markdown",
    "parse_backends",
    "run_runtime_bench",
    "table_rows",
    "write_results",
]
