"""OpenVINO as a runtime: converting an M2Det to OpenVINO's IR, and running the IR (FP32 or INT8)
on the CPU as a `m2det.inference.Network`.

The IR is converted straight from the PyTorch `DetectionGraph` that the ONNX export captures
(`torch.export`, then OpenVINO's PyTorch frontend; no ONNX step), so it has the same inputs and
outputs (`images` -> `boxes`, `scores`, `loc`, `logits`), and carries the same `m2det.*` metadata
as the ONNX file, in the IR's `rt_info` under `m2det`. `OpenVinoNetwork`
runs it with the inference precision pinned to f32: OpenVINO's CPU plugin otherwise runs in bf16
on CPUs with AVX512-BF16 or AMX, which would make "FP32" a bf16 result.

`openvino` is an optional dependency (`pip install "m2det[openvino]"`), imported only here, lazily.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from m2det.config import ModelConfig
from m2det.deploy.formats import INPUT_NAME, OUTPUT_NAMES, ExportedGraph, check_metadata
from m2det.errors import FileFormatError, M2DetError
from m2det.io.atomic import atomic_path

# rt_info section of the IR that holds the m2det metadata: rt_info/m2det/<key without "m2det.">
RT_INFO_SECTION = "m2det"
EXTRA_HINT = 'pip install "m2det[openvino]"'


def import_openvino() -> Any:
    """The `openvino` module, or a clear error naming the extra that installs it."""
    try:
        import openvino
    except ImportError:
        raise M2DetError(f"the OpenVINO backend needs the openvino package: {EXTRA_HINT}") from None
    return openvino


def convert_to_openvino(graph: torch.nn.Module, example: Tensor, metadata: dict[str, str]) -> Any:
    """`graph` (an `m2det.deploy.export.DetectionGraph`) as an `openvino.Model` with a dynamic
    batch, the export's input and output names, and `metadata` in its rt_info."""
    ov = import_openvino()
    size = int(example.shape[-1])
    with torch.no_grad(), warnings.catch_warnings():
        # torch.export, as the ONNX export uses it (TorchScript tracing, the converter's other way
        # in, is deprecated and slower); the batch dimension stays symbolic (`example` has 2)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        exported = torch.export.export(
            graph, (example,), dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}}
        )
        model = ov.convert_model(exported, input=[ov.PartialShape([-1, 3, size, size])])
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    for output, name in zip(model.outputs, OUTPUT_NAMES):
        output.get_tensor().set_names({name})
    set_metadata(model, metadata)
    return model


def set_metadata(model: Any, metadata: dict[str, str]) -> None:
    """Write the `m2det.*` entries of `metadata` into `model`'s rt_info (replacing earlier ones)."""
    for key, value in metadata.items():
        model.set_rt_info(value, [RT_INFO_SECTION, key.removeprefix("m2det.")])


def model_metadata(model: Any, source: Union[str, Path] = "the model") -> dict[str, str]:
    """The `m2det.*` metadata in an `openvino.Model`'s rt_info, checked like an ONNX file's."""
    found: dict[str, str] = {}
    if model.has_rt_info([RT_INFO_SECTION]):
        for key in model.get_rt_info([RT_INFO_SECTION]).astype(dict):
            found[f"m2det.{key}"] = str(model.get_rt_info([RT_INFO_SECTION, key]).astype(str))
    return check_metadata(found, Path(source), "OpenVINO")


def read_openvino_model(path: Union[str, Path]) -> Any:
    """The IR at `path` (`.xml`, with its `.bin` beside it) as an `openvino.Model`."""
    ov = import_openvino()
    path = Path(path)
    if path.suffix != ".xml":
        raise M2DetError(f"{path}: an OpenVINO model is an .xml file (with its .bin beside it)")
    if not path.is_file():
        raise FileNotFoundError(f"OpenVINO model not found: {path}")
    if not path.with_suffix(".bin").is_file():
        raise FileNotFoundError(f"{path}: its weights file {path.with_suffix('.bin').name} is missing")
    try:
        return ov.Core().read_model(str(path))
    except RuntimeError as exc:  # OpenVINO reports parse errors as RuntimeError
        raise FileFormatError(f"{path}: OpenVINO cannot read it ({exc})") from None


def read_openvino_metadata(path: Union[str, Path]) -> dict[str, str]:
    """The `m2det.*` metadata that `export_openvino` wrote into the IR (config, class names, ...)."""
    return model_metadata(read_openvino_model(path), path)


def save_openvino(model: Any, path: Union[str, Path]) -> Path:
    """Write `model` as `path` (.xml) and its weights beside it (.bin), uncompressed (FP32 weights
    stay FP32), each replaced atomically: the weights first, so an .xml never meets older weights."""
    ov = import_openvino()
    path = Path(path)
    if path.suffix != ".xml":
        raise M2DetError(f"{path}: an OpenVINO model is written as an .xml file (and a .bin beside it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".m2det-openvino-", dir=path.parent) as tmp:
        staged = Path(tmp) / "model.xml"
        ov.save_model(model, str(staged), compress_to_fp16=False)
        with atomic_path(path) as xml_tmp:
            with atomic_path(path.with_suffix(".bin")) as bin_tmp:
                os.replace(staged.with_suffix(".bin"), bin_tmp)
            os.replace(staged, xml_tmp)
    return path


def compile_for_cpu(model: Any, threads: Optional[int] = None) -> Any:
    """`model` compiled for the CPU: f32 inference precision (not the bf16 the plugin picks on CPUs
    with AVX512-BF16/AMX; quantised ops still run in int8), `threads` threads (default: as many as
    torch uses, as ONNX Runtime gets), one stream tuned for latency."""
    ov = import_openvino()
    from openvino import properties
    from openvino.properties import hint

    config = {
        hint.inference_precision: ov.Type.f32,
        hint.performance_mode: hint.PerformanceMode.LATENCY,
        properties.inference_num_threads: int(threads or torch.get_num_threads()),
    }
    return ov.Core().compile_model(model, "CPU", config)


class OpenVinoNetwork(ExportedGraph):
    """An OpenVINO IR run on the CPU: a normalised batch `[N, 3, S, S]` -> `(loc, logits)`.

    `source` is an `.xml` file from `m2det export` or an `openvino.Model` (from
    `convert_to_openvino`, for a model converted on the fly). The graph was converted for one input
    size S (`fixed_input_size`); outputs come back on the device of the batch given.
    `outputs(batch)` gives every graph output by name.
    """

    dtype = torch.float32

    def __init__(self, source: Any, threads: Optional[int] = None):
        if isinstance(source, (str, Path)):
            self.path: Optional[Path] = Path(source)
            model = read_openvino_model(source)
        else:
            self.path, model = None, source
        self.metadata = model_metadata(model, self.path or "the converted model")
        self.config = ModelConfig.from_dict(json.loads(self.metadata["m2det.config"]))
        self.config.backbone.weights = None  # the IR holds the trained weights
        self.fixed_input_size: Optional[int] = int(self.metadata["m2det.input_size"])
        self.threads = int(threads or torch.get_num_threads())
        self.compiled = compile_for_cpu(model, self.threads)
        self.output_names = [next(iter(o.get_names())) for o in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one call at a time

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "the converted model"

    def _feed(self, batch: Tensor) -> np.ndarray:
        expected = (3, self.input_size, self.input_size)
        if batch.dim() != 4 or tuple(batch.shape[1:]) != expected:
            raise M2DetError(
                f"{self.name}: the graph takes a batch [N, {', '.join(map(str, expected))}] (it was "
                f"converted for input size {self.input_size}), got {tuple(batch.shape)}"
            )
        return batch.detach().to("cpu", torch.float32).contiguous().numpy()

    def outputs(self, batch: Tensor, names: Optional[list[str]] = None) -> dict[str, Tensor]:
        names = names or self.output_names
        x = self._feed(batch)
        with self._lock:
            self._request.infer({INPUT_NAME: x})
            # copies: the request's output buffers are overwritten by its next call
            values = {name: torch.from_numpy(self._request.get_tensor(name).data.copy()) for name in names}
        return {name: value.to(batch.device) for name, value in values.items()}

    def forward_raw(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        out = self.outputs(batch, ["loc", "logits"])
        return out["loc"], out["logits"]

    __call__ = forward_raw
