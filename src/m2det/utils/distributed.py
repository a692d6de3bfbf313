"""Sharding work over the processes of a `torch.distributed` group, and the few collectives it needs.

Kept free of other m2det modules so that every layer (the detection runs of `m2det.inference` as
well as the engine's evaluation and training) shards the same way. Outside a process group, or
in a group of one, every function is the single-process identity: one shard holding everything.

The shards are interleaved: process r of N gets items r, r + N, r + 2N, ... Unlike
`torch.utils.data.DistributedSampler`, nothing is padded, so every item is in exactly one shard
and nothing is counted twice; the last shards are one item shorter when N does not divide the count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional, TypeVar

import torch.distributed as dist
from torch.utils.data import Sampler

T = TypeVar("T")


def active() -> bool:
    """Whether this process is one of a group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, number of processes) of the group this process belongs to; (0, 1) outside one."""
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard_indices(count: int, rank: int, world_size: int) -> range:
    """The indices of `count` items that process `rank` of `world_size` handles (interleaved, unpadded)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} does not fit a group of {world_size}")
    return range(rank, count, world_size)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items of `items` that process `rank` of `world_size` handles."""
    return [items[i] for i in shard_indices(len(items), rank, world_size)]


class ShardSampler(Sampler[int]):
    """The data set indices of this process's shard, in order; every index in exactly one shard.

    `rank` and `world_size` default to the active group's (the whole data set outside one).
    """

    def __init__(self, length: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        group_rank, group_size = rank_and_world()
        self.indices = shard_indices(
            length, group_rank if rank is None else rank, group_size if world_size is None else world_size
        )

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def barrier() -> None:
    """Wait for every process of the group (nothing outside one)."""
    if active():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """One picklable object from each process, in rank order."""
    if not active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The object held by rank `src`, on every process."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
