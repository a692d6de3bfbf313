"""A run folder's checkpoint: the model (`last.safetensors`) and the training state that resumes it.

The state (optimiser, scheduler, counters, RNG states) holds only tensors and plain values, so
that it loads with `torch.load(weights_only=True)`. `save_checkpoint` writes a checkpoint so that a
kill at any instant leaves a folder that resumes exactly, from the previous or the new epoch:

1. the state goes to a new file, `last_state_EEE_TAG.pt` (epoch and a random tag: it never
   replaces a file in use);
2. `last.safetensors` is replaced, in one rename, by the model whose metadata names that file:
   this rename is the commit, before it the folder resumes from the previous checkpoint;
3. the state files no longer named are deleted.

`remove_stale_files` deletes what a kill leaves behind (temporaries, state files nobody names).
Folders written before this scheme hold `last_state.pt`, paired with `last.safetensors` by epoch;
they resume too, and their first new checkpoint replaces it.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch

from m2det.config import ModelConfig
from m2det.errors import FileFormatError
from m2det.io.atomic import remove_temporaries, write_bytes_atomic
from m2det.io.checkpoint import read_metadata, save_model
from m2det.io.torchfile import read_torch_file

if TYPE_CHECKING:  # for annotations only
    from m2det.models.m2det import M2Det

PathLike = Union[str, Path]

STATE_VERSION = 1
LAST_MODEL = "last.safetensors"
LEGACY_STATE = "last_state.pt"  # the state file of run folders written before `save_checkpoint`
STATE_KEY = "state"  # the entry of the model's `extra` metadata that names its state file
_STATE_NAME = re.compile(r"last_state_\d+_[0-9a-f]{8}\.pt|" + re.escape(LEGACY_STATE))


@dataclass(frozen=True)
class Checkpoint:
    """A run folder's last checkpoint: the model file and the training state that belongs to it."""

    model_path: Path
    state_path: Path
    state: dict[str, Any]


def capture_rng_state() -> dict[str, Any]:
    """This process's random generators (Python, NumPy, torch CPU and CUDA) as plain values."""
    numpy_state = np.random.get_state()
    assert isinstance(numpy_state, tuple)  # the legacy form, which np.random's global MT19937 gives
    kind, keys, pos, has_gauss, cached = numpy_state
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


def save_training_state(path: PathLike, state: dict[str, Any]) -> Path:
    """Write the state atomically and durably: an interrupted save leaves the previous file as it was."""
    buffer = io.BytesIO()
    torch.save({"version": STATE_VERSION, **state}, buffer)
    # written from memory, so that a full disk raises an OSError naming the file
    return write_bytes_atomic(path, buffer.getbuffer())


def load_training_state(path: PathLike) -> dict[str, Any]:
    """Read a file written by `save_training_state` (weights_only: nothing but tensors and plain values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state not found: {path}")
    state = read_torch_file(path)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise FileFormatError(f"{path}: not an m2det training state (version {STATE_VERSION} expected)")
    return state


def save_checkpoint(
    run_dir: PathLike,
    model: M2Det,
    state: dict[str, Any],
    extra: dict[str, Any],
    config: Optional[ModelConfig] = None,
) -> Path:
    """Write `model` and its training `state` (with an `epoch`) as the run folder's last checkpoint.

    The steps are in the module docstring. An error leaves the previous checkpoint in place.
    Returns the path of the model file, `last.safetensors`; `config` as in `save_model`.
    """
    run_dir = Path(run_dir)
    state_path = run_dir / f"last_state_{int(state['epoch']):03d}_{secrets.token_hex(4)}.pt"
    save_training_state(state_path, state)
    try:
        save_model(model, run_dir / LAST_MODEL, extra={**extra, STATE_KEY: state_path.name}, config=config)
    except BaseException:
        # nothing names the new state unless the rename was done and only a later flush failed
        with contextlib.suppress(Exception):
            if named_state(run_dir) != state_path.name:
                state_path.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # committed: a leftover is removed at the next start
        _remove_states(run_dir, keep=state_path.name)
    return run_dir / LAST_MODEL


def load_checkpoint(run_dir: PathLike) -> Checkpoint:
    """The run folder's last checkpoint, checked to be one (errors name the folder or file)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    model_path = run_dir / LAST_MODEL
    if not model_path.is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no checkpoint: {LAST_MODEL} not found (a run writes it when its first "
            f"epoch ends)"
        )
    extra = _model_extra(model_path)
    state_path = run_dir / _state_name(model_path, extra)
    if not state_path.is_file():
        raise FileNotFoundError(f"{model_path}: its training state {state_path} is missing")
    state = load_training_state(state_path)
    if extra.get("epoch") != state["epoch"]:
        raise FileFormatError(
            f"{run_dir}: {LAST_MODEL} is from epoch {extra.get('epoch')} but {state_path.name} from epoch "
            f"{state['epoch']}; the run was interrupted while saving and cannot resume exactly"
        )
    return Checkpoint(model_path, state_path, state)


def named_state(run_dir: PathLike) -> Optional[str]:
    """The name of the state file that the folder's `last.safetensors` belongs to (None without one)."""
    model_path = Path(run_dir) / LAST_MODEL
    return _state_name(model_path, _model_extra(model_path)) if model_path.is_file() else None


def _model_extra(model_path: Path) -> dict[str, Any]:
    extra = json.loads(read_metadata(model_path).get("extra", "{}"))
    if not isinstance(extra, dict):
        raise FileFormatError(f"{model_path}: its extra metadata is not a mapping")
    return extra


def _state_name(model_path: Path, extra: dict[str, Any]) -> str:
    name = extra.get(STATE_KEY, LEGACY_STATE)
    if not isinstance(name, str) or not _STATE_NAME.fullmatch(name):
        raise FileFormatError(f"{model_path}: names {name!r} as its training state, not a state file name")
    return name


def remove_stale_files(run_dir: PathLike) -> list[Path]:
    """Delete what a killed run left in its folder: temporaries, and state files its model does not name.

    Returns the deleted paths. State files stay when the model cannot be read (nothing is sure then).
    """
    if not Path(run_dir).is_dir():
        return []
    removed = remove_temporaries(run_dir)
    try:
        keep = named_state(run_dir)
    except ValueError:
        return removed
    return removed + _remove_states(run_dir, keep)


def _remove_states(run_dir: PathLike, keep: Optional[str]) -> list[Path]:
    """Delete the folder's state files other than `keep`."""
    removed = []
    for path in Path(run_dir).iterdir():
        if path.name != keep and _STATE_NAME.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
