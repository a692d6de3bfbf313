"""The exported file's contract: format tag, input and output names. Its own module so that the
writer (`export`) and the readers (`onnx_backend`, `quantize`) share it without importing each other."""

from __future__ import annotations

FORMAT = "m2det-export/1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "loc", "logits")
NMS_OUTPUT_NAMES = ("det_boxes", "det_scores", "det_labels", "det_batch_index")
