"""Backbones that feed FFMv1: each returns a stride-8 (shallow) and a stride-16 (deep) feature map.

Built from torchvision's definitions where they fit: SSD's VGG16-reduced extends torchvision's
VGG16 conv stack exactly as the official code does, and ResNet-101 is torchvision's with layer3
at stride 1. Every backbone also states its feature map size arithmetically, so anchors can be
laid out for an input size without running the network.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Union

from torch import Tensor, nn
from torchvision.models import resnet101
from torchvision.models.vgg import cfgs, make_layers

from m2det.config import BackboneConfig
from m2det.io.torchfile import load_state_dict_file


def _half_floor(n: int) -> int:
    return n // 2


def _half_ceil(n: int) -> int:
    return math.ceil(n / 2)


class VGG16Reduced(nn.Module):
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


class ResNet101(nn.Module):
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


class TinyBackbone(nn.Module):
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


BACKBONES: dict[str, type[nn.Module]] = {"vgg16": VGG16Reduced, "resnet101": ResNet101, "tiny": TinyBackbone}


def backbone_class(name: str) -> type[nn.Module]:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(config: BackboneConfig) -> nn.Module:
    cls = backbone_class(config.name)
    backbone = cls(config.width) if cls is TinyBackbone else cls()
    if config.weights:
        load_backbone_weights(backbone, config.weights)
    return backbone


def feature_sizes_fn(name: str) -> Callable[[int], tuple[int, int]]:
    return backbone_class(name).feature_sizes  # type: ignore[attr-defined]


def _vgg_key(key: str) -> str:
    # official vgg16_reducedfc.pth: "N.weight"; torchvision vgg16: "features.N.weight"
    return "features." + key.removeprefix("features.")


def load_backbone_weights(backbone: nn.Module, path: Union[str, Path]) -> list[str]:
    """Load ImageNet weights from a local file into the backbone; returns the keys left at init.

    Accepts the official `vgg16_reducedfc.pth` or torchvision's VGG16 / ResNet-101 state dicts
    (classifier/fc entries are ignored). Raises if nothing matches or a shape disagrees.
    """
    state = load_state_dict_file(path)
    if isinstance(backbone, VGG16Reduced):
        state = {_vgg_key(k): v for k, v in state.items() if not k.startswith("classifier.")}
    else:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    if unexpected or mismatched or not state:
        raise ValueError(
            f"{path}: backbone weights do not fit {type(backbone).__name__}: "
            f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}; "
            f"shape mismatches {mismatched[:10]}"
        )
    missing = sorted(k for k in own if k not in state)
    backbone.load_state_dict(state, strict=False)
    return missing


__all__ = [
    "VGG16Reduced",
    "ResNet101",
    "TinyBackbone",
    "build_backbone",
    "backbone_class",
    "feature_sizes_fn",
    "load_backbone_weights",
]
