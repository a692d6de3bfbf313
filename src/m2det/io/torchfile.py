"""Safe loading of `.pth`/`.pt`/`.safetensors` weight files (never unpickles arbitrary objects)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

# Containers that training scripts commonly wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


def load_state_dict_file(path: Union[str, Path]) -> dict[str, Tensor]:
    """A flat name -> tensor dict from a local file, loaded with `weights_only=True`.

    A `module.` prefix left by DataParallel/DDP is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            raise ValueError(
                f"{path}: cannot be read as a weights-only PyTorch file ({type(exc).__name__}: {exc})"
            ) from None
    return as_state_dict(state, str(path))


def as_state_dict(state: Any, where: str) -> dict[str, Tensor]:
    """Unwrap common checkpoint containers and strip a `module.` prefix."""
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{where}: expected a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def shared_state_groups(model: torch.nn.Module) -> list[tuple[list[str], Tensor]]:
    """State dict entries grouped by the tensor they name (a shared module names one tensor many times)."""
    groups: dict[int, tuple[list[str], Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values())


@contextmanager
def errors_name(path: Union[str, Path], temporary_prefix: Optional[str] = None) -> Iterator[None]:
    """Make a system error raised inside name `path` when it names no file (a failed write or
    flush: disk full) or a temporary file starting with `temporary_prefix`, so that the message
    says which file could not be written."""
    try:
        yield
    except OSError as exc:
        named = exc.filename
        temporary = temporary_prefix is not None and Path(str(named)).name.startswith(temporary_prefix)
        if exc.errno is not None and (named is None or temporary):
            exc.filename, exc.filename2 = str(path), None
        raise


@contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash or an exception leaves any earlier file at `path` untouched. Errors of the file system
    while writing name `path`, not the temporary file.
    """
    path = Path(path)
    with errors_name(path, temporary_prefix=f".{path.name}."), _replaced_on_success(path) as tmp:
        yield tmp


@contextmanager
def _replaced_on_success(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes owner-only files (and so do writers that replace the file, like safetensors');
    # give the result the permissions a plain open() would
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    os.chmod(tmp, mode)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
