"""Peak memory of a stretch of work, on CUDA or from the operating system (Linux /proc, glibc, getrusage).

OS probing lives here, apart from the measurements that use it (`m2det.engine.bench`), so that the
platform-specific parts (ctypes, /proc) are in one place.
"""

from __future__ import annotations

import ctypes
import platform
import resource
from pathlib import Path
from typing import Callable, Optional

import torch


class PeakMemory:
    """Peak memory of what runs between `reset()` and `peak_mb()`, above the memory in use at `reset()`.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only, the allocator's cache excluded).
    CPU on Linux: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs);
    `reset()` first hands the C allocator's free memory back to the system (glibc `malloc_trim`),
    else memory freed earlier (e.g. by the previous batch size) would be reused unseen.
    Elsewhere: `getrusage` ru_maxrss, a peak over the process's whole life (a lower bound).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._trim = _malloc_trim()
        self.resettable = device.type == "cpu" and _can_reset_peak_rss()
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated minus the memory allocated before the runs"
        elif self.resettable:
            self.method = (
                "peak resident set size during the runs (Linux VmHWM, reset via /proc/self/clear_refs) minus the "
                "resident set just before them"
                + (", after glibc malloc_trim(0) returned freed memory to the system" if self._trim else "")
            )
        else:
            self.method = (
                "getrusage ru_maxrss (peak over the process's life, a lower bound) minus the resident set"
            )
        self.baseline_mb = 0.0

    def _current_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _proc_status_mb("VmRSS") if self.resettable else _maxrss_mb()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._trim is not None:
            self._trim(0)
        self.baseline_mb = self._current_mb()
        if self.resettable:
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline_mb
        peak = _proc_status_mb("VmHWM") if self.resettable else _maxrss_mb()
        return peak - self.baseline_mb


def _malloc_trim() -> Optional[Callable[[int], int]]:
    if platform.system() != "Linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


def _can_reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_mb("VmHWM") > 0
    except OSError:
        return False


def _proc_status_mb(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"/proc/self/status has no {field_name}")


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024  # bytes on macOS, kB on Linux


__all__ = ["PeakMemory"]
