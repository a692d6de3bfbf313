"""The fast inference path: an M2Det with folded BatchNorms, channels-last memory, inference mode,
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
from torch import Tensor

from m2det.deploy.fuse import fold_batchnorms
from m2det.errors import M2DetError
from m2det.models.m2det import M2Det

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class InferenceOptions:
    """What `optimize_for_inference` applied; kept on the model as `inference_options`."""

    fold_batchnorm: bool = True
    channels_last: bool = True
    compile: bool = False
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast; outputs returned as float32)
    cuda_graphs: bool = False  # via torch.compile(mode="reduce-overhead"), CUDA only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class InferenceM2Det(M2Det):
    """An M2Det prepared by `optimize_for_inference`: `forward_raw` runs under `torch.inference_mode`
    in the prepared memory format and precision, through the compiled network when compiled.

    The state dict no longer matches a training checkpoint (BatchNorms are folded away): keep the
    original model for saving.
    """

    inference_options: InferenceOptions
    _compiled_network: Optional[Callable[[Tensor], tuple[Tensor, Tensor]]]

    def forward_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        options = self.inference_options
        network = self._compiled_network or super().forward_raw
        with torch.inference_mode(), _autocast(x.device, options.precision):
            if options.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loc, logits = network(x)
        if options.cuda_graphs:  # a replayed graph overwrites its outputs on the next call
            loc, logits = loc.clone(), logits.clone()
        return loc.float(), logits.float()


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _inference_class(cls: type[M2Det]) -> type[InferenceM2Det]:
    if issubclass(cls, InferenceM2Det):
        return cls
    if cls is M2Det:
        return InferenceM2Det
    return type(f"Inference{cls.__name__}", (InferenceM2Det, cls), {})


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
) -> InferenceM2Det:
    """A copy of `model`, in eval mode, prepared for fast inference; `model` itself is untouched.

    Options left at None take `DEFAULT_OPTIONS`. `precision` other than
    fp32 runs under autocast (outputs differ from fp32 by the reduced precision). `cuda_graphs`
    (CUDA only) compiles with mode "reduce-overhead", which replays the network as a CUDA graph.
    """
    if isinstance(model, InferenceM2Det):
        raise ValueError("the model is already optimised for inference; pass the original model")
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
    # Swap the class in place, as torch.nn.utils.parametrize does, so the result keeps every
    # attribute and shared module of the copy and is still an M2Det (anchors, postprocess, ...).
    optimized.__class__ = _inference_class(type(model))
    optimized.inference_options = options
    optimized._compiled_network = None
    if options.compile:
        network = super(InferenceM2Det, optimized).forward_raw
        mode = "reduce-overhead" if options.cuda_graphs else None
        optimized._compiled_network = torch.compile(network, mode=mode)
    return optimized
