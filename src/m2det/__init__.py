"""M2Det: a one-stage detector built on the Multi-Level Feature Pyramid Network, in PyTorch."""

from __future__ import annotations

from typing import Union

from torch import Tensor

from m2det.analysis import Explanation, explain
from m2det.config import ModelConfig, get_config, list_presets
from m2det.inference.detector import Detector
from m2det.models import M2Det, build_model, config_anchors

__version__ = "0.1.0"


def anchors(name_or_config: Union[str, ModelConfig], input_size: Union[int, None] = None) -> Tensor:
    """The anchors `[A, 4]` (cx, cy, w, h; normalised) of a preset or config, in the official order."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return config_anchors(config, input_size)


def load_official(model: M2Det, path_or_state_dict, strict: bool = True):  # noqa: ANN001
    """Load an official M2Det checkpoint (path or state dict) into `model`; see `m2det.io.official`."""
    from m2det.io.official import load_official as _load

    return _load(model, path_or_state_dict, strict=strict)


def transfer_weights(model: M2Det, source, class_map=None):  # noqa: ANN001
    """Initialise `model` from a trained detector (our .safetensors, an official .pth or a state dict),
    for other classes too; returns what was loaded, mapped by class name and re-initialised. See
    `m2det.io.transfer`."""
    from m2det.io.transfer import transfer_weights as _transfer

    return _transfer(model, source, class_map=class_map)


__all__ = [
    "Detector",
    "Explanation",
    "M2Det",
    "ModelConfig",
    "anchors",
    "build_model",
    "explain",
    "get_config",
    "list_presets",
    "load_official",
    "transfer_weights",
    "__version__",
]
