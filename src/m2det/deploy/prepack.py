"""oneDNN weight prepacking for the CPU fast path: each convolution's weight reordered once into
oneDNN's blocked layout, and a ReLU that follows a convolution fused into it.

Eager PyTorch hands oneDNN a plain (NCHW or NHWC) weight, which oneDNN reorders into its blocked
layout on every call: for M2Det that is a copy of every weight (half a gigabyte for
m2det320_vgg16) per forward pass, and each ReLU is one more pass over its activation. The ops used
here are the ones torch.compile's inductor emits for the same purpose
(`mkldnn._reorder_convolution_weight`, `mkldnn._convolution_pointwise`), run from eager code.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, cast

import torch
from torch import Tensor, nn


def prepack_available(device: torch.device) -> bool:
    """Whether `device` is a CPU and this torch has oneDNN (mkldnn), which the packed convs need."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


class PackedConv2d(nn.Module):
    """An `nn.Conv2d` (optionally followed by a ReLU) with its weight in oneDNN's blocked layout.

    `input_shape` is the [N, C, H, W] the conv will mostly see: oneDNN chooses the weight layout for
    the shapes, and another shape still runs correctly (oneDNN then reorders the weight itself, as
    for an unpacked one). The weight is packed in the conv's own dtype: convert the conv first for
    bfloat16. The packed weight is no parameter or buffer (an opaque oneDNN tensor that can neither
    be saved nor moved), so the module is for inference on the CPU where it was built.
    """

    def __init__(self, conv: nn.Conv2d, relu: bool = False, input_shape: Optional[list[int]] = None):
        super().__init__()
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"{conv}: only plain nn.Conv2d with numeric zero padding can be prepacked")
        if not prepack_available(conv.weight.device):
            raise ValueError(f"{conv}: prepacking needs a CPU conv and a torch with oneDNN")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.padding = list(cast("tuple[int, ...]", conv.padding))
        self.stride, self.dilation, self.groups = list(conv.stride), list(conv.dilation), conv.groups
        self.relu = relu
        weight = conv.weight.detach()
        self.packed_weight = torch.ops.mkldnn._reorder_convolution_weight(
            weight, self.padding, self.stride, self.dilation, self.groups, input_shape
        )
        self.bias: Optional[Tensor] = None if conv.bias is None else conv.bias.detach().clone()
        self.weight_dtype = weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            self.packed_weight,
            self.bias,
            self.padding,
            self.stride,
            self.dilation,
            self.groups,
            "relu" if self.relu else "none",
            [],
            "",
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={tuple(self.stride)}, padding={tuple(self.padding)}, "
            f"dilation={tuple(self.dilation)}, relu={self.relu}, dtype={self.weight_dtype}"
        )


def _input_shapes(model: nn.Module, example: Tensor, run: Any) -> dict[nn.Conv2d, list[int]]:
    """The input shape each plain Conv2d of `model` sees when `run(example)` runs (first call)."""
    shapes: dict[nn.Conv2d, list[int]] = {}

    def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        shapes.setdefault(cast(nn.Conv2d, module), list(inputs[0].shape))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if type(m) is nn.Conv2d]
    try:
        with torch.inference_mode():
            run(example)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


@torch.no_grad()
def prepack_convolutions(
    model: nn.Module,
    example: Optional[Tensor] = None,
    run: Any = None,
    packer: Optional[Callable[[nn.Conv2d, bool, Optional[list[int]]], nn.Module]] = None,
) -> int:
    """Replace every plain `nn.Conv2d` of `model` (in eval mode, on the CPU) by a `PackedConv2d`, in
    place, fusing a ReLU that directly follows it in an `nn.Sequential` (Identity between them, as
    folded BatchNorms leave, is skipped); returns how many convs were packed.

    With `example` (and `run`, default `model`), the weights are packed for the shapes the convs
    see on it. Modules shared under several names are rewritten once and stay shared. `packer`
    (conv, relu, input shape) -> module builds the replacement instead of `PackedConv2d`, e.g.
    `m2det.deploy.winograd.pack_fastest`.
    """
    shapes = _input_shapes(model, example, run or model) if example is not None else {}
    packed: dict[nn.Conv2d, nn.Module] = {}
    build = packer or PackedConv2d

    def pack(conv: nn.Conv2d, relu: bool) -> nn.Module:
        if conv not in packed:
            packed[conv] = build(conv, relu, shapes.get(conv))
        return packed[conv]

    for module in list(model.modules()):  # unique modules: a shared one is rewritten once
        names = list(module._modules)
        for i, name in enumerate(names):
            child = module._modules[name]
            if type(child) is not nn.Conv2d:
                continue
            relu_name = None
            if isinstance(module, nn.Sequential):
                following = [n for n in names[i + 1 :] if not isinstance(module._modules[n], nn.Identity)]
                if following and isinstance(module._modules[following[0]], nn.ReLU):
                    relu_name = following[0]
            setattr(module, name, pack(child, relu=relu_name is not None))
            if relu_name is not None:
                setattr(module, relu_name, nn.Identity())
    return len(packed)


def count_packed(model: nn.Module) -> int:
    return sum(isinstance(m, PackedConv2d) for m in model.modules())
