"""Running an exported ONNX model with ONNX Runtime, behind the same interfaces as the PyTorch model.

* `OnnxRuntimeBackend`: the `Detector`'s backend seam (normalised batch -> `loc`, `logits`).
* `OnnxRuntimeM2Det`: an `M2Det` whose network is the ONNX file (geometry, preprocessing and
  post-processing come from the configuration stored in the file), so `m2det.Detector` and
  `m2det.engine.evaluate.evaluate` run it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from m2det.config import ModelConfig
from m2det.deploy.export import FORMAT, INPUT_NAME
from m2det.errors import FileFormatError, M2DetError
from m2det.models.m2det import M2Det


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
    return _check_metadata({p.key: p.value for p in proto.metadata_props}, path)


def _check_metadata(metadata: dict[str, str], path: Path) -> dict[str, str]:
    if metadata.get("m2det.format") != FORMAT or "m2det.config" not in metadata:
        raise FileFormatError(
            f"{path}: an ONNX model without m2det metadata; export models with `m2det export`"
        )
    return metadata


class OnnxRuntimeBackend:
    """An exported model run by ONNX Runtime: a normalised batch `[N, 3, S, S]` -> `(loc, logits)`.

    `outputs(batch)` gives every graph output by name (decoded boxes, scores, NMS results).
    """

    def __init__(
        self, path: Union[str, Path], threads: Optional[int] = None, providers: Optional[list[str]] = None
    ):
        self.path = Path(path)
        self.session = create_session(self.path, threads, providers)
        self.metadata = _check_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.config = ModelConfig.from_dict(json.loads(self.metadata["m2det.config"]))
        self.input_size = int(self.metadata["m2det.input_size"])
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

    def __call__(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        out = self.outputs(batch, ["loc", "logits"])
        return out["loc"], out["logits"]


class OnnxRuntimeM2Det(M2Det):
    """An M2Det whose network is an exported ONNX file run by ONNX Runtime.

    Only the light parts of the model exist (config, anchors, box coder, pixel means); the
    network's modules are built on the meta device, which allocates nothing, and then dropped.
    `forward_raw` runs the graph; the model has no parameters.
    """

    def __init__(
        self, path: Union[str, Path], threads: Optional[int] = None, providers: Optional[list[str]] = None
    ):
        backend = OnnxRuntimeBackend(path, threads, providers)
        config = backend.config
        config.backbone.weights = None  # the graph holds the trained weights
        with torch.device("meta"):
            super().__init__(config)
        self.backbone = self.mlfpn = self.head = None
        self.pixel_means = torch.tensor(config.pixel_means, dtype=torch.float32).view(1, 3, 1, 1)
        self.backend = backend
        self.eval()

    @property
    def input_size(self) -> int:
        return self.backend.input_size

    def forward_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.backend(x)

    def preprocess(
        self, images: Any, input_size: Optional[int] = None
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        if input_size is not None and int(input_size) != self.input_size:
            raise M2DetError(
                f"{self.backend.path}: exported for input size {self.input_size}, cannot run at {input_size} "
                "(export again with --size for another input size)"
            )
        return super().preprocess(images, input_size)


BACKENDS = ("pytorch", "onnxruntime")


def check_backend_choice(backend: Optional[str], weights: Optional[Union[str, Path]]) -> str:
    """The runtime for `weights` (an `.onnx` file runs on ONNX Runtime, anything else on PyTorch),
    with a clear error when an explicit `backend` cannot run that file."""
    is_onnx = weights is not None and Path(weights).suffix == ".onnx"
    chosen = backend or ("onnxruntime" if is_onnx else "pytorch")
    if chosen not in BACKENDS:
        raise M2DetError(f"--backend must be one of {BACKENDS}, got {chosen!r}")
    if chosen == "onnxruntime" and not is_onnx:
        raise M2DetError(
            f"--backend onnxruntime runs an exported .onnx model, got {weights or 'no --weights'}; "
            "export one first with `m2det export model.onnx --weights ...`"
        )
    if chosen == "pytorch" and is_onnx:
        raise M2DetError(f"{weights}: an .onnx model runs with --backend onnxruntime")
    return chosen
