"""Parameter and FLOP counts of a configuration, measured on the meta device (no memory, no compute)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from m2det.config import ModelConfig


@dataclass
class Complexity:
    params: int  # shared modules counted once
    gflops: float  # 2 x multiply-accumulates of one forward pass at batch 1
    input_size: int


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(config: ModelConfig, input_size: Optional[int] = None) -> Complexity:
    from m2det.models import build_model

    size = int(input_size or config.input_size)
    with torch.device("meta"):
        model = build_model(config).eval()
        x = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model.forward_raw(x)
    return Complexity(params=count_params(model), gflops=counter.get_total_flops() / 1e9, input_size=size)
