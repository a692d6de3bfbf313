"""BatchNorm folding for inference: every eval-mode BatchNorm of an M2Det merged into a convolution.

A BatchNorm that follows a conv becomes that conv's weight and bias (torch's `fuse_conv_bn_eval`).
MLFPN's `norm` follows a concat, so it is folded forward into the scale-0 head convs instead
(`AffineInputConv2d`). Modules shared under several names (the official `leach`) are rewritten
once, in place, and so stay shared.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck

from m2det.models.backbones import ResNet101

# Modules that apply `bnK` right after `convK` (torchvision's ResNet naming); folded pairwise.
_NAMED_PAIRS: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    ResNet101: (("conv1", "bn1"),),
}


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The per-channel (scale, shift) that an eval-mode BatchNorm applies: y = scale * x + shift."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn}: cannot fold a BatchNorm without running statistics")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's kernel_size/stride/padding/dilation (typed as any length) as the pair it is."""
    first, second = values
    return first, second


class AffineInputConv2d(nn.Module):
    """`conv(scale * x + shift)` for a per-input-channel affine map, with the map folded into the conv.

    The scale goes into the weight. The shift cannot simply go into the bias: zero padding pads
    the *shifted* input with zeros, so near the border part of the shift's contribution is cut
    off. That position-dependent contribution is the conv of a one-channel map of ones with the
    shift-weighted kernel summed over input channels: exact, and 1/C of the conv's cost.
    """

    shift_kernel: Tensor  # a buffer

    def __init__(self, conv: nn.Conv2d, scale: Tensor, shift: Tensor):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"{conv}: only ungrouped convs with numeric zero padding can absorb an input affine"
            )
        weight = conv.weight.detach()
        self.conv = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            _pair(conv.kernel_size),
            _pair(conv.stride),
            _pair(conv.padding),
            _pair(conv.dilation),
            bias=conv.bias is not None,
        ).to(weight.device, weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(weight * scale.view(1, -1, 1, 1))
            if conv.bias is not None and self.conv.bias is not None:  # both or neither have one
                self.conv.bias.copy_(conv.bias)
        self.register_buffer("shift_kernel", (weight * shift.view(1, -1, 1, 1)).sum(1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        ones = torch.ones((1, 1, x.shape[-2], x.shape[-1]), dtype=x.dtype, device=x.device)
        padding = cast("tuple[int, ...]", self.conv.padding)  # numeric: __init__ refuses string padding
        shift_term = F.conv2d(
            ones, self.shift_kernel.to(x.dtype), None, self.conv.stride, padding, self.conv.dilation
        )
        return self.conv(x) + shift_term


def _fold_sequential(seq: nn.Sequential) -> int:
    names = list(seq._modules)
    return _fold_named_pairs(seq, tuple(zip(names, names[1:])))


def _fold_named_pairs(module: nn.Module, pairs: tuple[tuple[str, str], ...]) -> int:
    folded = 0
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name), getattr(module, bn_name)
        if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d):
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())
            folded += 1
    return folded


def _fold_pyramid_norm(model: nn.Module) -> int:
    """MLFPN's `norm` (scale 0 only) into the scale-0 loc and conf heads, its only consumers."""
    # duck-typed: an M2Det, or any network laid out as one (mlfpn.norm, head.loc, head.conf)
    mlfpn: Any = getattr(model, "mlfpn", None)
    norm = getattr(mlfpn, "norm", None)
    if not isinstance(norm, nn.BatchNorm2d):
        return 0
    scale, shift = batchnorm_affine(norm)
    head: Any = model.head
    head.loc[0] = AffineInputConv2d(head.loc[0], scale, shift)
    head.conf[0] = AffineInputConv2d(head.conf[0], scale, shift)
    mlfpn.norm = nn.Identity()
    return 1


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> int:
    """Fold every BatchNorm of an eval-mode M2Det (or of one of its parts, e.g. a backbone) into a
    convolution, in place; returns how many.

    Raises if the model is in training mode (its BatchNorms would still be updating statistics).
    """
    if any(module.training for module in model.modules()):
        raise ValueError("fold_batchnorms needs a model in eval mode (call model.eval() first)")
    folded = 0
    for module in list(model.modules()):  # unique modules: a shared one is rewritten once
        if isinstance(module, nn.Sequential):
            folded += _fold_sequential(module)
        pairs = _NAMED_PAIRS.get(type(module))
        if pairs:
            folded += _fold_named_pairs(module, pairs)
    return folded + _fold_pyramid_norm(model)


def count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
