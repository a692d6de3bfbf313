"""The fast inference path: an M2Det network (a `m2det.inference.Network`) with folded BatchNorms, channels-last memory, inference mode,
and optionally torch.compile, autocast and CUDA graphs, whose outputs equal the original's.

Defaults follow the measurements in docs/deploy.md: folding and channels-last pay on the CPU and
are on; compile is off (half a minute of compilation for no measurable gain); reduced precision
is off because it changes outputs beyond float tolerance.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from m2det.config import ModelConfig
from m2det.deploy.fuse import fold_batchnorms
from m2det.errors import M2DetError
from m2det.models.m2det import M2Det

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class InferenceOptions:
    """What `optimize_for_inference` applied; kept on the result as `options`."""

    fold_batchnorm: bool = True
    channels_last: bool = True
    compile: bool = False
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast; outputs returned as float32)
    cuda_graphs: bool = False  # via torch.compile(mode="reduce-overhead"), CUDA only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OptimizedNetwork(nn.Module):
    """An M2Det network prepared by `optimize_for_inference`, as a `m2det.inference.Network`:
    `forward_raw` runs under `torch.inference_mode` in the prepared memory format and precision,
    through the compiled network when compiled, and returns float32.

    It holds its own copy of the model (`model`), whose state dict no longer matches a training
    checkpoint (BatchNorms are folded away): keep the original model for saving and export.
    """

    def __init__(self, model: M2Det, options: InferenceOptions):
        super().__init__()
        self.model = model
        self.options = options
        self._compiled: Optional[Callable[[Tensor], tuple[Tensor, Tensor]]] = None
        if options.compile:
            mode = "reduce-overhead" if options.cuda_graphs else None
            self._compiled = torch.compile(model.forward_raw, mode=mode)

    # what a runtime tells: the model's own geometry, any input size
    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def input_size(self) -> int:
        return self.model.input_size

    fixed_input_size: Optional[int] = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        options = self.options
        network = self._compiled or self.model.forward_raw
        with torch.inference_mode(), autocast(x.device, PRECISIONS[options.precision]):
            if options.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loc, logits = network(x)
        if options.cuda_graphs:  # a replayed graph overwrites its outputs on the next call
            loc, logits = loc.clone(), logits.clone()
        return loc.float(), logits.float()

    forward = forward_raw


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`'s kind; no-op for None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# The settings that `benchmarks/inference_options.py` and `m2det bench` found to pay on a CPU
# (docs/deploy.md). GPUs could not be measured for this project; they get the same, with autocast
# and CUDA graphs left to the caller.
DEFAULT_OPTIONS = InferenceOptions(fold_batchnorm=True, channels_last=True, compile=False)


def optimize_for_inference(
    model: M2Det,
    *,
    fold_batchnorm: Optional[bool] = None,
    channels_last: Optional[bool] = None,
    compile: Optional[bool] = None,
    precision: str = "fp32",
    cuda_graphs: bool = False,
) -> OptimizedNetwork:
    """A copy of `model`'s network, in eval mode, prepared for fast inference; `model` itself is untouched.

    Options left at None take `DEFAULT_OPTIONS`. `precision` other than
    fp32 runs under autocast (outputs differ from fp32 by the reduced precision). `cuda_graphs`
    (CUDA only) compiles with mode "reduce-overhead", which replays the network as a CUDA graph.
    """
    if isinstance(model, OptimizedNetwork):
        raise ValueError("the model is already optimised for inference; pass the original model")
    if not isinstance(model, M2Det):
        raise ValueError(f"optimize_for_inference takes a PyTorch M2Det, not a {type(model).__name__}")
    if precision not in PRECISIONS:
        raise M2DetError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    device = next(model.parameters()).device
    if cuda_graphs and device.type != "cuda":
        raise M2DetError(f"cuda_graphs needs a model on a CUDA device, this one is on {device}")
    defaults = DEFAULT_OPTIONS
    options = InferenceOptions(
        fold_batchnorm=defaults.fold_batchnorm if fold_batchnorm is None else fold_batchnorm,
        channels_last=defaults.channels_last if channels_last is None else channels_last,
        compile=(defaults.compile if compile is None else compile) or cuda_graphs,
        precision=precision,
        cuda_graphs=cuda_graphs,
    )
    optimized = copy.deepcopy(model).eval()
    if options.fold_batchnorm:
        fold_batchnorms(optimized)
    optimized.requires_grad_(False)
    if options.channels_last:
        optimized.to(memory_format=torch.channels_last)
    return OptimizedNetwork(optimized, options).eval()
