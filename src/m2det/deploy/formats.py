"""The exported file's contract: format tag, input and output names. Its own module so that the
writer (`export`) and the readers (`onnx_backend`, `openvino_backend`, `quantize`) share it without
importing each other."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from m2det.config import ModelConfig
from m2det.errors import FileFormatError

FORMAT = "m2det-export/1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "loc", "logits")
NMS_OUTPUT_NAMES = ("det_boxes", "det_scores", "det_labels", "det_batch_index")


def check_metadata(metadata: dict[str, str], path: Path, kind: str = "ONNX") -> dict[str, str]:
    """`metadata` when it is what `m2det export` writes (format tag and config), else a clear error
    naming the `kind` of file at `path`."""
    if metadata.get("m2det.format") != FORMAT or "m2det.config" not in metadata:
        raise FileFormatError(
            f"{path}: an {kind} model without m2det metadata; export models with `m2det export`"
        )
    return metadata


class ExportedGraph:
    """What a network read from an exported file tells alike on every runtime (ONNX Runtime,
    OpenVINO): its one input size, host memory for the batch, and how it was quantised."""

    config: ModelConfig
    metadata: dict[str, str]
    fixed_input_size: Optional[int]

    @property
    def input_size(self) -> int:
        """The size the graph was exported for, the only one it runs at."""
        return int(self.fixed_input_size or self.config.input_size)

    @property
    def device(self) -> torch.device:
        """Where the batch is prepared: both runtimes read their input from host memory."""
        return torch.device("cpu")

    @property
    def quantization(self) -> Optional[dict[str, Any]]:
        """How `m2det export --int8` quantised the graph, or None for an FP32 graph."""
        value = self.metadata.get("m2det.quantization")
        return json.loads(value) if value else None
