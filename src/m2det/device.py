"""Choosing the device: names checked here, so a wrong one is a clear error, not a failure deep inside;
and how many CPU cores this process may use, for data workers and compute threads."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from m2det.errors import M2DetError


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
        raise M2DetError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise M2DetError(f"device: {str(device)!r} requested but CUDA is not available here")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise M2DetError(
            f"device: {str(device)!r} requested but only {torch.cuda.device_count()} CUDA devices exist"
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise M2DetError(f"device: {str(device)!r} requested but MPS is not available here")
    return resolved


# More DataLoader workers than this rarely speed up M2Det training (decoding and augmenting a
# batch takes less time than the step on it), and each holds a copy of the data set.
MAX_DEFAULT_WORKERS = 4


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask where the system has one (set by
    `taskset`, a container's cpuset or a batch scheduler), else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(cores: Optional[int] = None, processes: int = 1) -> int:
    """DataLoader workers that fit the machine: one core less than it has (one stays with the training
    process), at most `MAX_DEFAULT_WORKERS`; 0 on one core, where the main process loads the data.
    Never more than the cores, which is what torch warns about. With several `processes` on the
    machine (torchrun), each gets its share of the cores."""
    cores = max(1, (usable_cores() if cores is None else cores) // processes)
    return max(0, min(MAX_DEFAULT_WORKERS, cores - 1))
