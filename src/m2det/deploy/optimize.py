"""The fast inference path: an M2Det network (a `m2det.inference.Network`) with folded BatchNorms,
channels-last memory, oneDNN-prepacked convolutions, inference mode, and optionally torch.compile,
reduced precision and CUDA graphs, whose outputs equal the original's.

Defaults follow the measurements in docs/deploy.md: folding, channels-last and prepacking pay on
the CPU and are on; compile is off (half a minute of compilation for no measurable gain); reduced
precision is off because it changes outputs beyond float tolerance.
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
from m2det.deploy.prepack import prepack_available, prepack_convolutions
from m2det.deploy.winograd import pack_fastest
from m2det.device import cpu_supports_bf16, cpu_supports_fp16
from m2det.errors import M2DetError
from m2det.models.m2det import M2Det

# name -> the dtype the network computes in (None: float32). "winograd" is float32 with each 3x3
# stride-1 conv run by Winograd's algorithm where that measures faster (CPU, m2det.deploy.winograd):
# outputs within about 1e-5 of their magnitude of fp32's, where bf16's are within about 1e-2.
PRECISIONS = {"fp32": None, "winograd": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class InferenceOptions:
    """What `optimize_for_inference` applied; kept on the result as `options`."""

    fold_batchnorm: bool = True
    channels_last: bool = True
    prepack: bool = True  # oneDNN-blocked conv weights + fused ReLU (CPU only; off with compile)
    compile: bool = False
    # fp32 | winograd | fp16 | bf16 (see PRECISIONS); outputs are returned as float32. On the CPU
    # the weights are converted once (`weights_converted`), elsewhere the network runs under autocast.
    precision: str = "fp32"
    weights_converted: bool = False
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
        reduced = PRECISIONS[options.precision]
        # converted weights take their input in their own dtype; autocast takes float32
        self._input_dtype = reduced if options.weights_converted else None
        self._autocast_dtype = None if options.weights_converted else reduced
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
        with torch.inference_mode(), autocast(x.device, self._autocast_dtype):
            memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
            x = x.to(dtype=self._input_dtype or x.dtype, memory_format=memory_format)  # one copy at most
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
DEFAULT_OPTIONS = InferenceOptions(fold_batchnorm=True, channels_last=True, prepack=True, compile=False)


def check_precision(precision: str, device: torch.device) -> None:
    """A clear error for a precision that is unknown, or that `device` (a CPU) cannot compute natively:
    oneDNN would emulate it with float32 arithmetic plus conversions, slower than float32 itself."""
    if precision not in PRECISIONS:
        raise M2DetError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "winograd" and not prepack_available(device):
        raise M2DetError(
            "precision winograd is for the CPU fast path (oneDNN-prepacked convs beside Winograd ones); "
            + (
                "this torch was built without oneDNN"
                if device.type == "cpu"
                else f"the model is on {device}, where cuDNN picks Winograd itself"
            )
            + "; use fp32"
        )
    if device.type != "cpu" or precision in ("fp32", "winograd"):
        return
    if precision == "bf16" and not cpu_supports_bf16():
        raise M2DetError(
            "precision bf16: this CPU lacks AVX512-BF16 and AMX (no avx512_bf16 or amx_bf16 flag in "
            "/proc/cpuinfo), so bfloat16 would be emulated and slower than fp32; use fp32"
        )
    if precision == "fp16" and not cpu_supports_fp16():
        raise M2DetError(
            "precision fp16: this CPU lacks AVX512-FP16 and AMX-FP16 (no avx512_fp16 or amx_fp16 flag in "
            "/proc/cpuinfo), so float16 would be emulated and slower than fp32; use fp32"
            + (", or bf16, which this CPU has" if cpu_supports_bf16() else "")
        )


def optimize_for_inference(
    model: M2Det,
    *,
    fold_batchnorm: Optional[bool] = None,
    channels_last: Optional[bool] = None,
    prepack: Optional[bool] = None,
    compile: Optional[bool] = None,
    precision: str = "fp32",
    cuda_graphs: bool = False,
) -> OptimizedNetwork:
    """A copy of `model`'s network, in eval mode, prepared for fast inference; `model` itself is untouched.

    Options left at None take `DEFAULT_OPTIONS`. `prepack` applies on the CPU only, and not with
    `compile` (inductor packs the weights itself). `precision` other than fp32 changes the outputs
    by the reduced precision: on the CPU the weights are converted once (refused where the CPU
    would only emulate it, see `check_precision`), elsewhere the network runs under autocast.
    `cuda_graphs` (CUDA only) compiles with mode "reduce-overhead", which replays the network as a
    CUDA graph.
    """
    if isinstance(model, OptimizedNetwork):
        raise ValueError("the model is already optimised for inference; pass the original model")
    if not isinstance(model, M2Det):
        raise ValueError(f"optimize_for_inference takes a PyTorch M2Det, not a {type(model).__name__}")
    device = next(model.parameters()).device
    check_precision(precision, device)
    if cuda_graphs and device.type != "cuda":
        raise M2DetError(f"cuda_graphs needs a model on a CUDA device, this one is on {device}")
    defaults = DEFAULT_OPTIONS
    compiled = (defaults.compile if compile is None else compile) or cuda_graphs
    winograd = precision == "winograd"
    if winograd and (compiled or prepack is False or channels_last):
        raise M2DetError(
            "precision winograd swaps the prepacked convs and runs in the contiguous memory format: "
            "it cannot go with compile, cuda_graphs, prepack=False or channels_last=True"
        )
    reduced = PRECISIONS[precision]
    options = InferenceOptions(
        fold_batchnorm=defaults.fold_batchnorm if fold_batchnorm is None else fold_batchnorm,
        channels_last=not winograd and (defaults.channels_last if channels_last is None else channels_last),
        prepack=(defaults.prepack if prepack is None else prepack)
        and not compiled
        and prepack_available(device),
        compile=compiled,
        precision=precision,
        weights_converted=reduced is not None and device.type == "cpu",
        cuda_graphs=cuda_graphs,
    )
    optimized = copy.deepcopy(model).eval()
    if options.fold_batchnorm:
        fold_batchnorms(optimized)
    optimized.requires_grad_(False)
    optimized.mlfpn.leach_once = True
    if options.weights_converted and reduced is not None:  # the network's parts: pixel means stay float32
        for part in (optimized.backbone, optimized.mlfpn, optimized.head):
            part.to(reduced)
    if options.channels_last:
        optimized.to(memory_format=torch.channels_last)
    if options.prepack:
        # packed for the shapes of one image at the model's size, the commonest call
        size = optimized.input_size
        example = torch.zeros(1, 3, size, size, device=device, dtype=reduced or torch.float32)
        if options.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        packer = pack_fastest if winograd else None
        prepack_convolutions(optimized, example, optimized.forward_raw, packer)
        if winograd:  # each FastestConv2d times its candidates for this, the commonest, shape now
            with torch.inference_mode():
                optimized.forward_raw(example)
    return OptimizedNetwork(optimized, options).eval()
