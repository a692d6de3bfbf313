"""Safe loading of `.pth`/`.pt`/`.safetensors` weight files (never unpickles arbitrary objects).

Atomic writing is `m2det.io.atomic`'s."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from m2det.errors import FileFormatError

# Containers that training scripts commonly wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")


def is_torch_file(path: Union[str, Path]) -> bool:
    """Whether `path` is in a `torch.save` format: a zip archive (PyTorch >= 1.6) or a legacy pickle.

    Only the first bytes are read, so a file of another kind is named as such before it is loaded.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # zip local header; pickle PROTO


def read_torch_file(path: Union[str, Path]) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU, with errors that name the file.

    A file that is no `torch.save` output is named as such before anything is unpickled, and a file
    weights_only refuses gets our explanation rather than torch's advice to drop weights_only.
    """
    path = Path(path)
    if not is_torch_file(path):
        raise FileFormatError(
            f"{path}: not a PyTorch file (neither a torch.save zip archive nor a legacy pickle); "
            "expected a .pth/.pt file written by torch.save"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused an operation of the file's pickle
        raise FileFormatError(_refusal(path, str(exc))) from None
    except EOFError:
        raise FileFormatError(
            f"{path}: ends early; the file looks truncated (an interrupted copy or download?)"
        ) from None
    except Exception as exc:  # a damaged file fails in many ways
        raise FileFormatError(
            f"{path}: cannot be read as a PyTorch file ({type(exc).__name__}: {exc})"
        ) from None


def load_state_dict_file(path: Union[str, Path]) -> dict[str, Tensor]:
    """A flat name -> tensor dict from a local `.safetensors` or `.pth`/`.pt` file (weights_only).

    A `module.` prefix left by DataParallel/DDP is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = read_torch_file(path)
    return as_state_dict(state, str(path))


def _refusal(path: Path, error: str) -> str:
    """Our message for what weights_only refused: torch's own invites a reload with weights_only=False,
    which would run whatever code the file carries."""
    detail = error.split("WeightsUnpickler error:", 1)[-1]
    reason = next((line.strip() for line in detail.splitlines() if line.strip()), "")
    if not re.search(r"GLOBAL|allowlist|unrecognized function", reason):  # damage, not objects
        return f"{path}: cannot be read as a PyTorch file, it looks damaged ({reason.split('. ')[0]})"
    found = re.search(r"GLOBAL (\S+)", reason)
    what = f" (such as {found.group(1)})" if found else ""
    return (
        f"{path}: holds pickled Python objects{what}, not only tensors. Unpickling them would run "
        "code from the file, which we refuse to do. Do NOT load it with torch.load(weights_only=False) "
        "unless you made the file yourself: a crafted .pth runs any code it likes. "
        "If you did make it (e.g. a whole model saved with torch.save(model)), re-save just its tensors "
        "where you made it, torch.save(model.state_dict(), 'weights.pth'), and use that file; an official "
        "checkpoint then converts with `m2det convert`."
    )


def as_state_dict(state: Any, where: str) -> dict[str, Tensor]:
    """Unwrap common checkpoint containers and strip a `module.` prefix."""
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FileFormatError(f"{where}: expected a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def shared_state_groups(model: torch.nn.Module) -> list[tuple[list[str], Tensor]]:
    """State dict entries grouped by the tensor they name (a shared module names one tensor many times)."""
    groups: dict[int, tuple[list[str], Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(groups.values())
