"""`Detector`: a model loaded once, then detections for paths, PIL images, numpy arrays or tensors.

    detector = m2det.Detector("m2det512.safetensors", device="cuda")
    result = detector("street.jpg")   # {"boxes", "scores", "labels", "label_names"}

The network is a `m2det.inference.Network` (the PyTorch model, an `.onnx` file run by ONNX
Runtime, or an OpenVINO `.xml` IR) inside a `DetectionPipeline`, so decoding, multi-scale merging and NMS stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from m2det.boxes.postprocess import PostProcessor, PostprocessSettings, get_settings
from m2det.device import resolve_device
from m2det.errors import M2DetError
from m2det.inference.network import Network, load_network
from m2det.inference.pipeline import DetectionPipeline
from m2det.io.image import to_rgb_tensor

ImageInput = Union[str, Path, np.ndarray, Tensor, Any]  # Any: a PIL image


class Detector:
    """Detect objects with an M2Det model.

    Args:
        weights: our `.safetensors` model file, an `.onnx` file from `m2det export` (run by ONNX
            Runtime), an OpenVINO `.xml` IR from `m2det export` (run by OpenVINO), or an official
            `.pth` checkpoint (then `preset` names its architecture, e.g. "m2det512_vgg16").
            None: RANDOM weights, with a warning.
        preset: the architecture for an official checkpoint or for random weights.
        device: where the network runs ("cpu", "cuda", "cuda:1", ...); an `.onnx` or `.xml`
            model runs on the CPU.
        score_threshold: the lowest score a returned detection has, applied after NMS (soft-NMS
            lowers the scores of overlapping boxes, so a candidate above it can end below); it is
            also the candidate threshold before NMS. None: the settings' own (candidates above 0.05
            for "paper", and everything NMS keeps returned, as evaluation wants for AP).
        settings: post-processing, "paper", "official" or a `PostprocessSettings`.
        batch_size: images per forward pass.
        sizes: input sizes for multi-scale testing (e.g. [320, 512, 704]); None: the model's own.
        flip: also run on the mirrored images and merge (flip testing).
        precision: "fp32", "winograd", "bf16" or "fp16" runs a PyTorch model on the fast path
            (`m2det.deploy.optimize_for_inference`) in that precision ("winograd": fp32 with 3x3
            convs by Winograd where faster, CPU only; bf16/fp16 on a CPU only where it computes
            them natively; outputs then differ by the reduced precision); None: the
            eager model. An `.onnx` model runs in its own precision (fp32 or None only).
        backend: "pytorch", "onnxruntime" or "openvino"; None: the file's own (`.onnx`: ONNX
            Runtime, `.xml`: OpenVINO, else PyTorch). "openvino" with a PyTorch model file
            converts it to OpenVINO (FP32) in memory.

    Calling the detector with one image returns one dict, with a list of images a list of dicts:
    `boxes` (xyxy float32, pixels of the original image), `scores`, `labels` (int64, 1-based) and
    `label_names`. Images may be file paths, PIL images, numpy arrays in OpenCV's layout (BGR, HWC,
    uint8, as `cv2.imread` returns them; HW grayscale too) or RGB CHW tensors (uint8, or float in
    [0, 1]); an NCHW tensor is a batch.
    """

    def __init__(
        self,
        weights: Union[str, Path, None] = None,
        preset: Optional[str] = None,
        device: Union[str, torch.device] = "cpu",
        score_threshold: Optional[float] = None,
        settings: Union[str, PostprocessSettings] = "paper",
        batch_size: int = 8,
        sizes: Optional[Sequence[int]] = None,
        flip: bool = False,
        precision: Optional[str] = None,
        backend: Optional[str] = None,
    ):
        if batch_size < 1:
            raise M2DetError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        chosen = get_settings(settings)
        if score_threshold is not None:
            chosen = chosen.replace(score_threshold=float(score_threshold), min_score=float(score_threshold))
        network = load_network(weights, preset, self.device, precision=precision, backend=backend)
        self.pipeline = DetectionPipeline(network, chosen, sizes=sizes, flip=flip)
        self.batch_size = int(batch_size)

    @property
    def network(self) -> Network:
        """What runs the network: the PyTorch `M2Det` (an `OptimizedNetwork` with a `precision`), or
        the ONNX Runtime / OpenVINO one."""
        return self.pipeline.network

    @property
    def model(self) -> Network:
        """The network (`network`), by its older name: the `M2Det` for a PyTorch model file."""
        return self.pipeline.network

    @property
    def postprocessor(self) -> PostProcessor:
        return self.pipeline.postprocessor

    @property
    def settings(self) -> PostprocessSettings:
        return self.pipeline.settings

    @property
    def sizes(self) -> list[int]:
        return self.pipeline.sizes

    @sizes.setter
    def sizes(self, sizes: Sequence[int]) -> None:
        for size in sizes:
            self.pipeline.check_size(size)
        self.pipeline.sizes = [int(s) for s in sizes]

    @property
    def flip(self) -> bool:
        return self.pipeline.flip

    @flip.setter
    def flip(self, flip: bool) -> None:
        self.pipeline.flip = bool(flip)

    @property
    def class_names(self) -> list[str]:
        """Foreground class names: label l is `class_names[l - 1]`."""
        return self.network.config.categories[1:]

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]]) -> Union[dict, list[dict]]:
        if isinstance(images, Tensor) and images.dim() == 4:
            return self.detect(list(images))
        if isinstance(images, (list, tuple)):
            return self.detect(images)
        return self.detect([images])[0]

    def detect(self, images: Sequence[ImageInput]) -> list[dict]:
        """One dict per image (see the class docstring), computed `batch_size` images at a time."""
        results: list[dict] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            device = self.network.device
            tensors = [
                to_rgb_tensor(image, f"images[{start + i}]").to(device) for i, image in enumerate(chunk)
            ]
            outputs = self.pipeline(tensors)
            results += [
                {k: v.cpu() if isinstance(v, Tensor) else v for k, v in out.items()} for out in outputs
            ]
        return results
