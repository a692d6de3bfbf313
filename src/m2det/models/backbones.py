"""Backbones that feed FFMv1: each returns a stride-8 (shallow) and a stride-16 (deep) feature map.

Built from torchvision's definitions where they fit: SSD's VGG16-reduced extends torchvision's
VGG16 conv stack exactly as the official code does, and ResNet-101 is torchvision's with layer3
at stride 1. Every backbone also states its feature map size arithmetically, so anchors can be
laid out for an input size without running the network.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Union

from torch import Tensor, nn
from torchvision.models import resnet101
from torchvision.models.vgg import cfgs, make_layers

from m2det.config import BackboneConfig
from m2det.errors import ConfigError, FileFormatError
from m2det.io.torchfile import load_state_dict_file


def _half_floor(n: int) -> int:
    return n // 2


def _half_ceil(n: int) -> int:
    return math.ceil(n / 2)


class Backbone(nn.Module):
    """What the MLFPN needs of a backbone: `forward(x) -> (shallow, deep)` and their channel counts."""

    shallow_channels: int
    deep_channels: int


class VGG16Reduced(Backbone):
    """SSD's VGG16-reduced: torchvision's VGG16 convs, ceil-mode pool3, pool5 3x3/s1, dilated conv6, conv7.

    `features` keeps the official layer indices 0..34 so that `base.N` keys map one to one.
    Features are taken after index 22 (conv4_3 + ReLU) and 34 (conv7 + ReLU).
    """

    shallow_channels = 512
    deep_channels = 1024
    shallow_index = 22

    def __init__(self) -> None:
        super().__init__()
        # torchvision's VGG16 conv stack (config "D") up to relu5_3, initialised as torchvision's VGG
        # does; building only the stack skips the 120 M-parameter classifier, which took seconds
        layers = list(make_layers(cfgs["D"]).children())[:30]
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                assert layer.bias is not None  # make_layers builds its convolutions with biases
                nn.init.zeros_(layer.bias)
        layers[16] = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        layers += [
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, kernel_size=1),
            nn.ReLU(inplace=True),
        ]
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shallow = self.features[: self.shallow_index + 1](x)
        deep = self.features[self.shallow_index + 1 :](shallow)
        return shallow, deep

    @staticmethod
    def feature_sizes(n: int) -> tuple[int, int]:
        s8 = _half_ceil(_half_floor(_half_floor(n)))
        return s8, _half_floor(s8)


class ResNet101(Backbone):
    """torchvision's ResNet-101 with layer3 at stride 1 (the official variant): layer2 and layer4 out."""

    shallow_channels = 512
    deep_channels = 2048

    def __init__(self) -> None:
        super().__init__()
        net = resnet101(weights=None)
        net.layer3[0].conv2.stride = (1, 1)
        net.layer3[0].downsample[0].stride = (1, 1)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        shallow = self.layer2(self.layer1(x))
        deep = self.layer4(self.layer3(shallow))
        return shallow, deep

    @staticmethod
    def feature_sizes(n: int) -> tuple[int, int]:
        s8 = _half_ceil(_half_ceil(_half_ceil(n)))
        return s8, _half_ceil(s8)


class TinyBackbone(Backbone):
    """A light VGG-style stack with BatchNorm, for demos and tests that train on a CPU in minutes."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.stem = nn.Sequential(
            *block(3, w // 2), nn.MaxPool2d(2, 2),
            *block(w // 2, w), nn.MaxPool2d(2, 2),
            *block(w, 2 * w), nn.MaxPool2d(2, 2, ceil_mode=True),
            *block(2 * w, 2 * w),
        )  # fmt: skip
        self.deep = nn.Sequential(nn.MaxPool2d(2, 2), *block(2 * w, 4 * w), *block(4 * w, 4 * w))
        self.shallow_channels = 2 * w
        self.deep_channels = 4 * w

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shallow = self.stem(x)
        return shallow, self.deep(shallow)

    @staticmethod
    def feature_sizes(n: int) -> tuple[int, int]:
        return VGG16Reduced.feature_sizes(n)


BACKBONES: dict[str, type[Backbone]] = {"vgg16": VGG16Reduced, "resnet101": ResNet101, "tiny": TinyBackbone}


def backbone_class(name: str) -> type[Backbone]:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(config: BackboneConfig) -> Backbone:
    cls = backbone_class(config.name)
    backbone = cls(config.width) if cls is TinyBackbone else cls()
    if config.weights:
        load_backbone_weights(backbone, config.weights)
    return backbone


def feature_sizes_fn(name: str) -> Callable[[int], tuple[int, int]]:
    return backbone_class(name).feature_sizes  # type: ignore[attr-defined]


# SSD's "reduced" fc6/fc7 (Liu et al. 2016, after ParseNet): every 4th of the 4096 output units, and
# fc6's 7x7 receptive field (it reads pool5 as 512x7x7) sampled at rows/columns 0, 3, 6 for the
# dilated 3x3 conv6. Indices of conv6 / conv7 in `VGG16Reduced.features` (and the official file).
VGG_FC_STEP = 4
VGG_FC6_TAPS = 3
CONV6, CONV7 = 31, 33


def reduce_vgg_fc(
    fc6_weight: Tensor, fc6_bias: Tensor, fc7_weight: Tensor, fc7_bias: Tensor
) -> dict[str, Tensor]:
    """torchvision VGG16's fc6 [4096, 25088] and fc7 [4096, 4096] -> conv6 [1024, 512, 3, 3], conv7 [1024, 1024, 1, 1]."""
    if tuple(fc6_weight.shape) != (4096, 512 * 7 * 7) or tuple(fc7_weight.shape) != (4096, 4096):
        raise FileFormatError(
            f"fc6/fc7 of VGG16 must be [4096, 25088] and [4096, 4096], got {list(fc6_weight.shape)} "
            f"and {list(fc7_weight.shape)}"
        )
    step, taps = VGG_FC_STEP, VGG_FC6_TAPS
    conv6 = fc6_weight.reshape(4096, 512, 7, 7)[::step, :, ::taps, ::taps]
    conv7 = fc7_weight[::step, ::step].reshape(4096 // step, 4096 // step, 1, 1)
    return {
        f"features.{CONV6}.weight": conv6.contiguous().clone(),
        f"features.{CONV6}.bias": fc6_bias[::step].contiguous().clone(),
        f"features.{CONV7}.weight": conv7.contiguous().clone(),
        f"features.{CONV7}.bias": fc7_bias[::step].contiguous().clone(),
    }


def infer_backbone_name(state: dict[str, Tensor]) -> str:
    """Which backbone an ImageNet (or converted) state dict is for: vgg16, resnet101 or tiny."""
    keys = set(state)
    if any(k.startswith("layer1.") for k in keys):
        return "resnet101"
    if any(k.startswith("stem.") for k in keys):
        return "tiny"
    if any(re.match(r"^(features\.)?\d+\.weight$", k) for k in keys):
        return "vgg16"
    raise FileFormatError(
        "not the state dict of a backbone m2det knows: expected torchvision's VGG16 or ResNet-101 "
        f"(or the official vgg16_reducedfc.pth); first keys {sorted(keys)[:5]}"
    )


def convert_backbone_state(state: dict[str, Tensor], name: str) -> tuple[dict[str, Tensor], list[str]]:
    """An ImageNet state dict in our backbone's names, and notes on what was converted or dropped.

    * vgg16: torchvision's (`features.N`, `classifier.{0,3,6}`): fc6/fc7 become the reduced conv6 /
      conv7 (`reduce_vgg_fc`), the 1000-class fc8 is dropped; the official `vgg16_reducedfc.pth`
      (`N.weight`, conv6/conv7 at 31/33) and our converted files are taken as they are.
    * resnet101: torchvision's, without its 1000-class `fc`.
    """
    notes: list[str] = []
    if name == "vgg16":
        if any(k.endswith("running_mean") for k in state):
            raise FileFormatError(
                "this VGG16 has BatchNorm layers (torchvision's vgg16_bn?); M2Det's VGG16 (SSD's reduced "
                "VGG16) has none: use torchvision's plain VGG16 weights or vgg16_reducedfc.pth"
            )
        fc = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
        out = {
            "features." + k.removeprefix("features."): v
            for k, v in state.items()
            if not k.startswith("classifier.")
        }
        if all(k in state for k in fc):
            if any(k in out for k in (f"features.{CONV6}.weight", f"features.{CONV7}.weight")):
                raise FileFormatError(
                    "the file holds both fc6/fc7 (classifier.*) and conv6/conv7: which to use is unclear"
                )
            out.update(reduce_vgg_fc(*(state[k] for k in fc)))
            notes.append(
                "fc6 -> conv6 [1024, 512, 3, 3] and fc7 -> conv7 [1024, 1024, 1, 1] (SSD's reduced VGG16: "
                "every 4th unit, fc6's 7x7 sampled 3x3)"
            )
        dropped = sorted(k for k in state if k.startswith("classifier.") and k not in fc)
        if dropped:
            notes.append(f"dropped the ImageNet classifier {', '.join(dropped)}")
        return out, notes
    if name == "resnet101":
        dropped = sorted(k for k in state if k.startswith("fc."))
        if dropped:
            notes.append(f"dropped the ImageNet classifier {', '.join(dropped)}")
        return {k: v for k, v in state.items() if not k.startswith("fc.")}, notes
    return dict(state), notes


def _listed(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_backbone_weights(backbone: nn.Module, path: Union[str, Path]) -> list[str]:
    """Load ImageNet weights from a local file into the backbone, strictly; returns notes on the conversion.

    Accepts torchvision's VGG16 (fc6/fc7 converted to conv6/conv7, see `convert_backbone_state`)
    and ResNet-101 state dicts, the official `vgg16_reducedfc.pth`, and files written by
    `m2det convert-backbone`. Every tensor of the backbone must come from the file and every
    tensor of the file must have a place (the ImageNet classifier aside): otherwise a ValueError
    lists what was left at init, what had no place and what differs in shape.
    """
    return load_backbone_state(backbone, load_state_dict_file(path), str(path))


def load_backbone_state(
    backbone: nn.Module, state: dict[str, Tensor], where: str = "state dict"
) -> list[str]:
    """`load_backbone_weights` for a state dict already in memory; `where` names it in errors."""
    name = next((k for k, cls in BACKBONES.items() if isinstance(backbone, cls)), None)
    if name is None:
        raise TypeError(f"not an m2det backbone: {type(backbone).__name__}")
    state, notes = convert_backbone_state(state, name)
    own = backbone.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors of the backbone are not in the file: {_listed(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors of the file have no place: {_listed(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shapes differ: {_listed(mismatched)}")
        hint = {
            "vgg16": "torchvision's VGG16 (not VGG16-BN) with its classifier, or vgg16_reducedfc.pth",
            "resnet101": "torchvision's ResNet-101 (not ResNet-50 or -152)",
            "tiny": "a file written from this tiny backbone",
        }[name]
        raise FileFormatError(
            f"{where}: backbone weights do not fit {type(backbone).__name__} (expected {hint}); "
            + "; ".join(problems)
        )
    backbone.load_state_dict(state, strict=True)
    return notes


__all__ = [
    "VGG16Reduced",
    "ResNet101",
    "TinyBackbone",
    "build_backbone",
    "backbone_class",
    "feature_sizes_fn",
    "load_backbone_weights",
    "load_backbone_state",
    "convert_backbone_state",
    "infer_backbone_name",
    "reduce_vgg_fc",
]
