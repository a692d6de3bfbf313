"""Our model file: weights as safetensors with the model configuration in its metadata.

One file rebuilds the model. Shared modules are stored once. Writes are atomic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from m2det.config import ModelConfig
from m2det.errors import FileFormatError
from m2det.io.atomic import write_bytes_atomic
from m2det.io.torchfile import shared_state_groups

if TYPE_CHECKING:  # models imports io: a run-time import would be a cycle
    from m2det.models.m2det import M2Det

FORMAT = "m2det"


def save_model(
    model: M2Det,
    path: Union[str, Path],
    extra: Union[dict[str, Any], None] = None,
    config: Union[ModelConfig, None] = None,
) -> Path:
    """Write `model` (an M2Det) to `path` as safetensors + config, atomically and durably.

    `config` is written instead of `model.config` when given (the trainer adds the data's class
    names there rather than changing the caller's model)."""
    path = Path(path)
    metadata = {"format": FORMAT, "config": (config or model.config).to_json()}
    if extra:
        metadata["extra"] = json.dumps(extra)
    unique = {names[0]: tensor.detach().cpu().contiguous() for names, tensor in shared_state_groups(model)}
    # serialised in memory, so that a full disk raises an OSError naming the file (see write_bytes_atomic)
    return write_bytes_atomic(path, save(unique, metadata=metadata))


def load_weights(model: torch.nn.Module, path: Union[str, Path]) -> None:
    """Load a file written by `save_model` into `model`, strictly, filling in shared names."""
    stored = load_file(str(path))
    state: dict[str, Tensor] = {}
    for names, _ in shared_state_groups(model):
        found = [n for n in names if n in stored]
        if found:
            state.update({n: stored[found[0]] for n in names})
    own = model.state_dict().keys()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in stored if k not in own)
    if missing or unexpected:
        raise FileFormatError(
            f"{path}: weights do not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    model.load_state_dict(state, strict=True)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise FileFormatError(f"{path}: not a safetensors file ({exc})") from None


def read_safetensors(path: Union[str, Path]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the metadata of any safetensors file (ours or not); errors name the file."""
    path = Path(path)
    metadata = _safetensors_metadata(path)
    try:
        return load_file(str(path)), metadata
    except Exception as exc:  # safetensors raises its own error types
        raise FileFormatError(f"{path}: not a readable safetensors file ({exc})") from None


def is_model_metadata(metadata: dict[str, str]) -> bool:
    """Whether safetensors metadata is that of our model file (format tag and configuration)."""
    return metadata.get("format") == FORMAT and "config" in metadata


def read_metadata(path: Union[str, Path]) -> dict[str, str]:
    """The metadata of our model file; other files are refused with a message saying what to do."""
    path = Path(path)
    metadata = _safetensors_metadata(path)
    if not is_model_metadata(metadata):
        raise FileFormatError(
            f"{path}: a safetensors file without an m2det config; convert official .pth files with `m2det convert`"
        )
    return metadata


def read_config(path: Union[str, Path]) -> ModelConfig:
    return ModelConfig.from_dict(json.loads(read_metadata(path)["config"]))
