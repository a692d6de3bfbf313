"""Choosing the device: names checked here, so a wrong one is a clear error, not a failure deep inside;
how many CPU cores this process may use, for data workers and compute threads; and whether the CPU
computes bfloat16 natively."""

from __future__ import annotations

import os
from pathlib import Path
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


# The x86 instructions that compute bfloat16 natively (Linux's names in /proc/cpuinfo): AVX512-BF16
# (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids and later). Without them oneDNN emulates
# bfloat16 with float32 arithmetic plus conversions, slower than float32 itself.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_FP16_FLAGS = ("avx512_fp16", "amx_fp16")  # Sapphire Rapids (AVX512-FP16), Granite Rapids (AMX-FP16)
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Optional[str] = None) -> Optional[frozenset[str]]:
    """The CPU's feature flags from the `flags` line of /proc/cpuinfo (or of the text `cpuinfo`);
    None where there is no such file (macOS, Windows) or no flags line."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def cpu_supports_bf16(cpuinfo: Optional[str] = None) -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16): from /proc/cpuinfo's
    flags (or the text `cpuinfo`), else from torch's own CPU detection; False elsewhere (ARM, Apple)."""
    flags = cpu_flags(cpuinfo)
    if flags is not None:
        return any(flag in flags for flag in CPU_BF16_FLAGS)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def cpu_supports_fp16(cpuinfo: Optional[str] = None) -> bool:
    """Whether this CPU computes float16 natively (AVX512-FP16 or AMX-FP16), as `cpu_supports_bf16`."""
    flags = cpu_flags(cpuinfo)
    if flags is not None:
        return any(flag in flags for flag in CPU_FP16_FLAGS)
    return bool(getattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)())
