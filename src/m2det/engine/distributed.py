"""Multi-GPU and multi-machine training: the process group that `torchrun` describes, and small collectives.

`torchrun --nproc-per-node G [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] -m m2det.cli.main
train ...` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup` reads them and
joins the group with NCCL on GPUs and gloo on the CPU. A plain run is a group of one and never
touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from m2det.device import resolve_device
from m2det.errors import M2DetError
from m2det.utils.distributed import active, all_gather_objects, barrier, broadcast_object

__all__ = [
    "DistInfo",
    "active",
    "all_gather_objects",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup",
    "env_info",
    "setup",
]

# Long, because the other processes wait while rank 0 scores the validation (and, in `m2det detect`,
# merges the results).
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, number of processes, rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """The rank layout from torchrun's environment variables (a single process when they are unset)."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = os.environ.get(name, str(default))
        try:
            values[name] = int(raw)
        except ValueError:
            raise M2DetError(f"environment variable {name} must be an integer, got {raw!r}") from None
    info = DistInfo(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise M2DetError(f"RANK={info.rank} does not fit WORLD_SIZE={info.world_size}")
    return info


def setup(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group described by the environment (if any) and pick this process's device."""
    info = env_info()
    target = resolve_device(device, info.local_rank)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if info.is_distributed and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", timeout=PROCESS_GROUP_TIMEOUT)
    return info, target


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of `tensor` over all processes (a copy; the input itself is unchanged)."""
    out = tensor.detach().clone()
    if active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out
