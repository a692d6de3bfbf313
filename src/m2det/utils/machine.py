"""The machine a speed figure was measured on: CPU model, the vector and matrix flags that decide the
speed of CPU kernels, cores, torch threads and load. Every speed figure is written with it, since
the same model runs several times faster with AVX-512 VNNI or AMX than without."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

# The instruction-set flags that decide which CPU kernels oneDNN / ONNX Runtime can use.
CPU_FLAGS: tuple[str, ...] = (
    "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip


def _cpuinfo_field(name: str) -> str:
    """The first value of `name` in /proc/cpuinfo ("" where there is none, e.g. not on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    """The CPU's model name, e.g. `AMD EPYC 9654 96-Core Processor`."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def speed_flags() -> dict[str, bool]:
    """Each flag of `CPU_FLAGS`: whether this CPU has it (all False where /proc/cpuinfo is missing)."""
    from m2det.device import cpu_flags

    present = cpu_flags() or frozenset()
    return {flag: flag in present for flag in CPU_FLAGS}


def present_speed_flags() -> list[str]:
    """The `CPU_FLAGS` this CPU has, e.g. `["avx2", "avx512f", "avx512_vnni"]`."""
    return [flag for flag, on in speed_flags().items() if on]


def machine_info() -> dict[str, Any]:
    """CPU model and flags, cores (all and usable by this process), torch's version and threads, the
    thread variables set in the environment and the load average now: JSON-ready."""
    from m2det.device import usable_cores

    info: dict[str, Any] = {
        "model": cpu_model(),
        "flags": speed_flags(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def describe_flags(flags: dict[str, bool]) -> str:
    """`avx2 yes, avx512f yes, ..., amx_tile no`: the flags as a line of text."""
    return ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in flags.items())
