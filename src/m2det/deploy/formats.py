"""The exported file's contract: format tag, input and output names. Its own module so that the
writer (`export`) and the readers (`onnx_backend`, `openvino_backend`, `quantize`) share it without
importing each other."""

from __future__ import annotations

from pathlib import Path

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
