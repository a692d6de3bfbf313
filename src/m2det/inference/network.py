"""The seam between the detector and its runtime: `Network`, and loading one from a file.

A network takes a batch in the official input convention (BGR, 0..255 minus the means, square)
and returns raw `(loc [N, A, 4], logits [N, A, C])` in the official anchor order. Everything
around it (resizing, normalising, anchors, decoding, NMS) is `DetectionPipeline`'s, the same for
every runtime:

* eager PyTorch: `m2det.M2Det` itself,
* the fast PyTorch path: `m2det.deploy.OptimizedNetwork` (`optimize_for_inference`),
* ONNX Runtime, FP32 or INT8: `m2det.deploy.onnx_backend.OnnxRuntimeNetwork`,
* OpenVINO, FP32 or INT8: `m2det.deploy.openvino_backend.OpenVinoNetwork`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

from m2det.config import ModelConfig
from m2det.errors import FileFormatError, M2DetError
from m2det.io.torchfile import is_torch_file
from m2det.models.m2det import M2Det

DEFAULT_PRESET = "m2det320_vgg16"
BACKENDS = ("pytorch", "onnxruntime", "openvino")
# The file each exported format is written as, and the runtime that runs it.
EXPORTED_SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino"}


@runtime_checkable
class Network(Protocol):
    """A runtime of the M2Det network: what the pipeline around it needs to know, and the call."""

    @property
    def config(self) -> ModelConfig:
        """Geometry, classes, input means: what preprocessing and decoding follow."""
        ...

    fixed_input_size: Optional[int]  # the one square size it runs at (an exported graph), None: any

    @property
    def input_size(self) -> int:
        """The square size it runs at by default."""
        ...

    @property
    def device(self) -> torch.device:
        """Where its input batch must be."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of its input batch."""
        ...

    def forward_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`[N, 3, S, S]` in the official convention -> `(loc [N, A, 4], logits [N, A, C])`."""
        ...


def check_backend_choice(backend: Optional[str], weights: Optional[Union[str, Path]]) -> str:
    """The runtime for `weights`, with a clear error when an explicit `backend` cannot run that file.

    An `.onnx` file runs on ONNX Runtime, an `.xml` (OpenVINO IR) on OpenVINO, anything else on
    PyTorch; `openvino` also runs a PyTorch model file (or a preset's random weights), converted
    in memory when it is loaded.
    """
    suffix = Path(weights).suffix if weights is not None else ""
    exported = EXPORTED_SUFFIXES.get(suffix)
    chosen = backend or exported or "pytorch"
    if chosen not in BACKENDS:
        raise M2DetError(f"--backend must be one of {BACKENDS}, got {chosen!r}")
    if exported is not None and chosen != exported:
        raise M2DetError(f"{weights}: an {suffix} model runs with --backend {exported}, not {chosen}")
    if chosen == "onnxruntime" and exported is None:
        raise M2DetError(
            f"--backend onnxruntime runs an exported .onnx model, got {weights or 'no --weights'}; "
            "export one first with `m2det export model.onnx --weights ...`"
        )
    return chosen


def check_precision_choice(
    precision: Optional[str], weights: Optional[Union[str, Path]], backend: str = "pytorch"
) -> None:
    """A clear error for a precision the runtime cannot honour: ONNX Runtime and OpenVINO run a
    model in the precision it was exported in (FP32, or INT8 from `m2det export --int8`)."""
    if precision is None:
        return
    from m2det.deploy.optimize import PRECISIONS

    if precision not in PRECISIONS:
        raise M2DetError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if backend != "pytorch" and precision != "fp32":
        runtime = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}.get(backend, backend)
        raise M2DetError(
            f"--precision {precision}: {weights or 'the model'} runs on {runtime} in the precision it was "
            "exported in (FP32, or INT8 with `m2det export --int8`); --precision applies to PyTorch models"
        )


def load_network(
    weights: Union[str, Path, None],
    preset: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    threads: Optional[int] = None,
    precision: Optional[str] = None,
    backend: Optional[str] = None,
) -> Network:
    """The network a model file holds, ready to run on `backend` (default: the file's own, see
    `check_backend_choice`): an `.onnx` export on ONNX Runtime, an `.xml` IR on OpenVINO (both on
    the CPU, with `threads`), anything else as `load_model_for_inference` reads it, on `device`, in
    eval mode, or with `backend="openvino"` converted to OpenVINO in memory (FP32).

    `precision` (fp32, winograd, bf16, fp16) runs a PyTorch model on the fast path
    (`m2det.deploy.optimize_for_inference`) in that precision; None keeps the eager `M2Det`.
    """
    chosen = check_backend_choice(backend, weights)
    check_precision_choice(precision, weights, chosen)
    if chosen == "onnxruntime":
        from m2det.deploy.onnx_backend import OnnxRuntimeNetwork

        assert weights is not None  # check_backend_choice refuses onnxruntime without an .onnx file
        return OnnxRuntimeNetwork(weights, threads=threads)
    if chosen == "openvino":
        from m2det.deploy.openvino_backend import OpenVinoNetwork

        if weights is not None and Path(weights).suffix == ".xml":
            return OpenVinoNetwork(weights, threads=threads)
        from m2det.deploy.export import openvino_model

        model = load_model_for_inference(weights, preset).eval()
        return OpenVinoNetwork(openvino_model(model), threads=threads)
    if precision is None:
        return load_model_for_inference(weights, preset).to(device).eval()
    from m2det.deploy.optimize import check_precision, optimize_for_inference

    check_precision(precision, torch.device(device))  # before a large file is read
    model = load_model_for_inference(weights, preset).to(device).eval()
    return optimize_for_inference(model, precision=precision)


def load_model_for_inference(weights: Union[str, Path, None], preset: Optional[str]) -> M2Det:
    """Our model file, an official checkpoint with its preset, or random weights (with a warning):
    the PyTorch model (export and the fast path start from it)."""
    from m2det.config import get_config
    from m2det.models import build_model

    if weights is None:
        name = preset or DEFAULT_PRESET
        warnings.warn(
            f"no weights given: {name} has RANDOM weights, so its detections mean nothing. "
            "Pass a .safetensors model file, or an official .pth with its preset.",
            UserWarning,
            stacklevel=3,
        )
        config = get_config(name)
        config.backbone.weights = None
        return build_model(config)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix in EXPORTED_SUFFIXES:
        raise M2DetError(
            f"{path}: an exported {path.suffix} model is no PyTorch model; run it with load_network"
        )
    if path.suffix == ".safetensors":
        from m2det.models.loading import load_model

        model = load_model(path)
        if preset is not None and preset != model.config.name:
            raise M2DetError(
                f"{path}: holds a {model.config.name} model, not {preset}; leave out the preset for .safetensors files"
            )
        return model
    if not is_torch_file(path):
        raise FileFormatError(
            f"{path}: not a model file; expected our .safetensors model (from training or `m2det convert`), "
            "an official M2Det .pth checkpoint (with its preset), or an .onnx or OpenVINO .xml file from "
            "`m2det export`"
        )
    if preset is None:
        raise M2DetError(
            f"{path}: an official checkpoint needs its preset (e.g. m2det512_vgg16) to know the architecture"
        )
    from m2det.models.loading import build_official_model

    return build_official_model(path, preset)
