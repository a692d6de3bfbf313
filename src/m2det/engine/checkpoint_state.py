"""The resumable part of a training run (`last_state.pt`): optimiser, scheduler, counters, RNG states.

Weights live in our model file beside it (`last.safetensors`); this file holds only tensors and
plain Python values so that it loads with `torch.load(weights_only=True)`. Writes are atomic.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from m2det.io.torchfile import atomic_path

STATE_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """This process's random generators (Python, NumPy, torch CPU and CUDA) as plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Union[str, Path], state: dict[str, Any]) -> Path:
    """Write the state atomically: an interrupted save leaves the previous file as it was."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"version": STATE_VERSION, **state}, tmp)
    return path


def load_training_state(path: Union[str, Path]) -> dict[str, Any]:
    """Read a file written by `save_training_state` (weights_only: nothing but tensors and plain values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise ValueError(f"{path}: not a readable training state ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: not an m2det training state (version {STATE_VERSION} expected)")
    return state
