"""`Detector`: a model loaded once, then detections for paths, PIL images, numpy arrays or tensors.

    detector = m2det.Detector("m2det512.safetensors", device="cuda")
    result = detector("street.jpg")   # {"boxes", "scores", "labels", "label_names"}

The network is the model's `forward_raw`, so another runtime (an `.onnx` file through ONNX
Runtime) stands in for PyTorch while decoding, multi-scale merging and NMS stay the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from m2det.boxes.postprocess import PostProcessor, PostprocessSettings, get_settings
from m2det.device import resolve_device
from m2det.errors import FileFormatError, M2DetError
from m2det.inference.multiscale import detect_multiscale
from m2det.io.image import to_rgb_tensor
from m2det.io.torchfile import is_torch_file
from m2det.models.m2det import M2Det, pyramid_sizes

DEFAULT_PRESET = "m2det320_vgg16"

ImageInput = Union[str, Path, np.ndarray, Tensor, Any]  # Any: a PIL image


class Detector:
    """Detect objects with an M2Det model.

    Args:
        weights: our `.safetensors` model file, an `.onnx` file from `m2det export` (run by ONNX
            Runtime), or an official `.pth` checkpoint (then `preset`
            names its architecture, e.g. "m2det512_vgg16"). None: RANDOM weights, with a warning.
        preset: the architecture for an official checkpoint or for random weights.
        device: where the network runs ("cpu", "cuda", "cuda:1", ...).
        score_threshold: the lowest score a returned detection has, applied after NMS (soft-NMS
            lowers the scores of overlapping boxes, so a candidate above it can end below); it is
            also the candidate threshold before NMS. None: the settings' own (candidates above 0.05
            for "paper", and everything NMS keeps returned, as evaluation wants for AP).
        settings: post-processing, "paper", "official" or a `PostprocessSettings`.
        batch_size: images per forward pass.
        sizes: input sizes for multi-scale testing (e.g. [320, 512, 704]); None: the model's own.
        flip: also run on the mirrored images and merge (flip testing).

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
    ):
        if batch_size < 1:
            raise M2DetError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.model = load_model_for_inference(weights, preset).to(self.device).eval()
        chosen = get_settings(settings)
        if score_threshold is not None:
            chosen = chosen.replace(score_threshold=float(score_threshold), min_score=float(score_threshold))
        self.postprocessor = PostProcessor(
            self.model.box_coder, chosen, categories=self.model.config.categories
        )
        self.sizes = [int(s) for s in sizes] if sizes else [self.model.input_size]
        for size in self.sizes:
            pyramid_sizes(self.model.config, size)  # raises a clear error for a size the net cannot take
        self.flip = bool(flip)
        self.batch_size = int(batch_size)

    @property
    def settings(self) -> PostprocessSettings:
        return self.postprocessor.settings

    @property
    def class_names(self) -> list[str]:
        """Foreground class names: label l is `class_names[l - 1]`."""
        return self.model.config.categories[1:]

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
            tensors = [
                to_rgb_tensor(image, f"images[{start + i}]").to(self.device) for i, image in enumerate(chunk)
            ]
            with torch.inference_mode():
                outputs = detect_multiscale(self.model, self.postprocessor, tensors, self.sizes, self.flip)
            results += [
                {k: v.cpu() if isinstance(v, Tensor) else v for k, v in out.items()} for out in outputs
            ]
        return results


def load_model_for_inference(weights: Union[str, Path, None], preset: Optional[str]) -> M2Det:
    """Our model file, an official checkpoint with its preset, or random weights (with a warning)."""
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
    if path.suffix == ".onnx":  # an `m2det export` file, run by ONNX Runtime
        from m2det.deploy.onnx_backend import OnnxRuntimeM2Det

        return OnnxRuntimeM2Det(path)
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
            "an official M2Det .pth checkpoint (with its preset) or an .onnx file from `m2det export`"
        )
    if preset is None:
        raise M2DetError(
            f"{path}: an official checkpoint needs its preset (e.g. m2det512_vgg16) to know the architecture"
        )
    from m2det.models.loading import build_official_model

    return build_official_model(path, preset)
