"""Choosing the device: names checked here, so a wrong one is a clear error, not a failure deep inside."""

from __future__ import annotations

from typing import Union

import torch


def resolve_device(device: Union[str, torch.device], local_rank: int = 0) -> torch.device:
    """`auto` picks this process's GPU when CUDA is available, else the CPU; `cuda` means cuda:LOCAL_RANK.

    Any other torch device name (cpu, cuda:1, mps) is checked to exist on this machine.
    """
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, str) and device == "cuda":
        device = f"cuda:{local_rank}"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r} requested but CUDA is not available here")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"device: {str(device)!r} requested but only {torch.cuda.device_count()} CUDA devices exist"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {str(device)!r} requested but MPS is not available here")
    return resolved
