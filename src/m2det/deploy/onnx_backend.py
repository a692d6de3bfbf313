"""Running an exported ONNX model (FP32 or INT8) with ONNX Runtime, as a `m2det.inference.Network`.

`OnnxRuntimeNetwork` takes the normalised batch and returns `(loc, logits)` like `M2Det.forward_raw`;
the configuration stored in the file tells the pipeline around it (`m2det.inference.DetectionPipeline`)
how to preprocess, lay out anchors and decode, so `Detector`, evaluation and `m2det bench` run it as
they run the PyTorch model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from m2det.config import ModelConfig
from m2det.deploy.formats import INPUT_NAME, ExportedGraph, check_metadata
from m2det.errors import FileFormatError, M2DetError


def create_session(
    path: Union[str, Path], threads: Optional[int] = None, providers: Optional[list[str]] = None
) -> Any:
    """An `onnxruntime.InferenceSession` with every graph optimisation, `threads` intra-op threads
    (default: as many as torch uses) and the CPU provider unless `providers` says otherwise."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise FileFormatError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc})") from None


def read_onnx_metadata(path: Union[str, Path]) -> dict[str, str]:
    """The `m2det.*` metadata that `export_onnx` wrote (config, class names, input convention, ...)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors
        raise FileFormatError(f"{path}: not an ONNX model ({exc})") from None
    return check_metadata({p.key: p.value for p in proto.metadata_props}, path)


class OnnxRuntimeNetwork(ExportedGraph):
    """An exported model run by ONNX Runtime: a normalised batch `[N, 3, S, S]` -> `(loc, logits)`.

    The graph was exported for one input size S (`fixed_input_size`); it runs on the CPU unless
    `providers` says otherwise, and returns its outputs on the device of the batch it was given.
    `outputs(batch)` gives every graph output by name (decoded boxes, scores, NMS results).
    """

    dtype = torch.float32

    def __init__(
        self, path: Union[str, Path], threads: Optional[int] = None, providers: Optional[list[str]] = None
    ):
        self.path = Path(path)
        self.session = create_session(self.path, threads, providers)
        self.metadata = check_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.config = ModelConfig.from_dict(json.loads(self.metadata["m2det.config"]))
        self.config.backbone.weights = None  # the graph holds the trained weights
        self.fixed_input_size: Optional[int] = int(self.metadata["m2det.input_size"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _feed(self, batch: Tensor) -> dict[str, np.ndarray]:
        expected = (3, self.input_size, self.input_size)
        if batch.dim() != 4 or tuple(batch.shape[1:]) != expected:
            raise M2DetError(
                f"{self.path}: the graph takes a batch [N, {', '.join(map(str, expected))}] (it was exported "
                f"for input size {self.input_size}), got {tuple(batch.shape)}"
            )
        return {INPUT_NAME: batch.detach().to("cpu", torch.float32).contiguous().numpy()}

    def outputs(self, batch: Tensor, names: Optional[list[str]] = None) -> dict[str, Tensor]:
        names = names or self.output_names
        values = self.session.run(names, self._feed(batch))
        return {name: torch.from_numpy(value).to(batch.device) for name, value in zip(names, values)}

    def forward_raw(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        out = self.outputs(batch, ["loc", "logits"])
        return out["loc"], out["logits"]

    __call__ = forward_raw
