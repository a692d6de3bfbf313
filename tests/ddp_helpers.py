"""What the multi-process tests share: a free port, and a spawned worker's torchrun-style environment."""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as_rank(rank: int, world_size: int, port: int) -> None:
    """Set the environment torchrun would give process `rank` of `world_size` on this machine (the
    gloo group is then made by the code under test), one CPU thread each."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
