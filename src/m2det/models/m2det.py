"""M2Det: backbone -> MLFPN -> SSD heads, with the torchvision-style detection interface on top."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from m2det.boxes.anchors import AnchorGenerator, check_feature_sizes
from m2det.boxes.coder import BoxCoder
from m2det.config import ModelConfig, get_config, with_overrides
from m2det.models.backbones import build_backbone, feature_sizes_fn
from m2det.models.head import M2DetHead
from m2det.models.mlfpn import MLFPN, BasicConv
from m2det.models.ssd import SSDPyramid
from m2det.models.transform import normalize, pixel_means_tensor, resize_and_normalize


def pyramid_sizes(config: ModelConfig, input_size: Optional[int] = None) -> list[int]:
    """Spatial size of each pyramid scale (largest first) for a square input, without running the net."""
    size = int(input_size or config.input_size)
    shallow, deep = feature_sizes_fn(config.backbone.name)(size)
    if config.mlfpn.kind == "mlfpn":
        sizes = MLFPN.scale_sizes(shallow, config.mlfpn.num_scales)
    else:
        sizes = SSDPyramid.scale_sizes(shallow, deep, config.mlfpn.num_scales)
    check_feature_sizes(sizes, size, config.name)
    return sizes


def build_pyramid(shallow_channels: int, deep_channels: int, config: ModelConfig) -> Union[MLFPN, SSDPyramid]:
    """The module between backbone and heads that `config.mlfpn.kind` names: the MLFPN, or one of
    Table 2's SSD baselines (see `m2det.models.variants`)."""
    if config.mlfpn.kind == "mlfpn":
        return MLFPN(shallow_channels, deep_channels, config.mlfpn)
    return SSDPyramid(shallow_channels, deep_channels, config.mlfpn)


def config_anchors(config: ModelConfig, input_size: Optional[int] = None) -> Tensor:
    """Anchors `[A, 4]` (cx, cy, w, h; normalised) of a config for a square input of `input_size`
    (default: the config's), in the official order; no network is built."""
    size = int(input_size or config.input_size)
    return AnchorGenerator(config.anchors, config.input_size)(size, pyramid_sizes(config, size))


class M2Det(nn.Module):
    """The M2Det detector; also the eager PyTorch runtime of the `m2det.inference.Network` seam.

    * `forward_raw(x)`: a batch already in the official convention (BGR, minus the means, 0..255)
      -> `(loc [N, A, 4], logits [N, A, C])` in the official anchor order.
    * `forward(images, targets=None)`: torchvision style. `images` is a list of CHW RGB tensors
      (float in [0, 1] or uint8); in training mode with targets (`boxes` xyxy pixels, `labels`
      1..C-1) it returns the loss dict, in eval mode one dict per image with `boxes` in that
      image's pixels, `scores` and `labels`.
    """

    pixel_means: Tensor  # a buffer: [1, 3, 1, 1], BGR order

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = build_backbone(config.backbone)
        # named `mlfpn` whatever `config.mlfpn.kind` builds: checkpoints and tools know the name
        self.mlfpn = build_pyramid(self.backbone.shallow_channels, self.backbone.deep_channels, config)
        self.head = M2DetHead(
            self.mlfpn.scale_channels,
            config.anchors.num_anchors_per_location,
            config.num_classes,
            config.mlfpn.num_scales,
        )
        self.anchor_generator = AnchorGenerator(config.anchors, config.input_size)
        self.box_coder = BoxCoder(config.anchors.variances)
        self.register_buffer("pixel_means", pixel_means_tensor(config.pixel_means), persistent=False)
        self.loss_fn: Any = None  # built on first use, see `compute_loss`
        self.postprocessor: Any = None  # for `forward` alone: see `set_postprocess`
        self.transfer_report: Any = None  # set by `build_model(weights=...)`
        self._init_weights()

    def _init_weights(self) -> None:
        """The official init for new layers: Kaiming-normal (fan_out) convs, BN 1/0, zero biases."""
        for module in self.mlfpn.modules():
            if isinstance(module, BasicConv):
                nn.init.kaiming_normal_(module.conv.weight, mode="fan_out")
            if isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for conv in [*self.head.loc, *self.head.conf]:
            nn.init.zeros_(conv.bias)

    # ----- geometry -----
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def input_size(self) -> int:
        """The square input the model runs at by default (an exported graph may fix another)."""
        return self.config.input_size

    # ----- what a runtime tells (the `m2det.inference.Network` seam) -----
    fixed_input_size: Optional[int] = None  # eager PyTorch runs at any size the pyramid allows

    @property
    def device(self) -> torch.device:
        """Where the network runs and its input batch must be (also without parameters)."""
        return self.pixel_means.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the input batch the network takes."""
        return self.pixel_means.dtype

    def anchors(self, input_size: Optional[int] = None) -> Tensor:
        """Anchors `[A, 4]` (cx, cy, w, h), normalised, for a square input of `input_size`."""
        size = int(input_size or self.input_size)
        return self.anchor_generator(size, pyramid_sizes(self.config, size))  # cached per size

    def anchor_level_sizes(self, input_size: Optional[int] = None) -> list[int]:
        """How many of `anchors(input_size)` each pyramid level holds, largest level first."""
        per_location = self.config.anchors.num_anchors_per_location
        return [f * f * per_location for f in pyramid_sizes(self.config, int(input_size or self.input_size))]

    # ----- network -----
    def forward_raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw predictions for a batch in the official input convention (see the class docstring)."""
        shallow, deep = self.backbone(x)
        return self.head(self.mlfpn(shallow, deep))

    def normalize(self, images: Tensor) -> Tensor:
        """RGB in [0, 1], [N, 3, H, W] -> the official convention (BGR, 0..255 minus the means)."""
        return normalize(images, self.pixel_means)

    def preprocess(
        self, images: Sequence[Tensor], input_size: Optional[int] = None
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """Resize each CHW RGB image to the square input and normalise; also return original sizes."""
        return resize_and_normalize(images, int(input_size or self.input_size), self.pixel_means)

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Optional[list[dict[str, Tensor]]] = None,
        input_size: Optional[int] = None,
    ) -> Union[dict[str, Tensor], list[dict[str, Tensor]]]:
        """See the class docstring; `input_size` runs the network at another square size than the
        model's own (multi-scale training), the anchors following it."""
        x, sizes = self.preprocess(images, input_size)
        loc, logits = self.forward_raw(x)
        anchors = self.anchors(x.shape[-1]).to(loc.device)
        if self.training:
            if targets is None:
                raise ValueError(
                    "targets are required in training mode (a list of dicts with boxes and labels)"
                )
            levels = self.anchor_level_sizes(x.shape[-1])
            return self.compute_loss(loc, logits, anchors, normalize_targets(targets, sizes), levels)
        return self.postprocess(loc, logits, anchors, sizes)

    def compute_loss(
        self,
        loc: Tensor,
        logits: Tensor,
        anchors: Tensor,
        targets: list[dict[str, Tensor]],
        level_sizes: Optional[list[int]] = None,
    ) -> dict[str, Tensor]:
        """The SSD multibox loss (`loss_fn`, the paper's unless set, e.g. by the trainer from its
        config); `targets` hold boxes normalised to [0, 1] (xyxy); `level_sizes` as `anchor_level_sizes`."""
        if self.loss_fn is None:
            from m2det.boxes.loss import MultiBoxLoss

            self.loss_fn = MultiBoxLoss(self.box_coder)
        return self.loss_fn(loc, logits, anchors, targets, level_sizes)

    def postprocess(
        self, loc: Tensor, logits: Tensor, anchors: Tensor, sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Eval-mode `forward`'s post-processing: the paper's unless `set_postprocess` chose other."""
        if self.postprocessor is None:
            self.set_postprocess("paper")
        return self.postprocessor(loc, logits, anchors, sizes)

    def set_postprocess(self, settings: Any = "paper") -> None:
        """Deprecated convenience: the post-processing of eval-mode `forward` only ("paper",
        "official" or a `PostprocessSettings`). Nothing else reads it: `Detector`, evaluation and
        `m2det.inference.DetectionPipeline` take their settings explicitly."""
        from m2det.boxes.postprocess import PostProcessor

        self.postprocessor = PostProcessor(self.box_coder, settings, categories=self.config.categories)


def normalize_targets(
    targets: list[dict[str, Tensor]], sizes: list[tuple[int, int]]
) -> list[dict[str, Tensor]]:
    """Pixel xyxy boxes of each image -> boxes normalised by that image's width and height."""
    if len(targets) != len(sizes):
        raise ValueError(f"got {len(targets)} targets for {len(sizes)} images")
    out = []
    for i, (target, (h, w)) in enumerate(zip(targets, sizes)):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{i}]: needs 'boxes' (xyxy pixels) and 'labels', has {sorted(target)}")
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        scale = boxes.new_tensor([w, h, w, h])
        out.append(
            {**target, "boxes": boxes / scale, "labels": torch.as_tensor(target["labels"], dtype=torch.int64)}
        )
    return out


def build_model(
    name: Union[str, ModelConfig, None] = None, *, weights: Any = None, **overrides: Any
) -> M2Det:
    """Build an M2Det from a preset name (or a config) with overrides, e.g. ``num_classes=21``.

    With `weights` (our `.safetensors`, an official `.pth` or a state dict) the model starts from
    that trained detector, for other classes too (``class_names=[...]``; the class count follows):
    every tensor that fits is loaded and the class rows are mapped by name (see
    `m2det.io.transfer`). The architecture is then the checkpoint's own unless `name` gives one;
    for an official checkpoint, which holds no configuration, `name` is the preset it was trained
    as. What was loaded is in `model.transfer_report`. Without `name` or `weights`: m2det320_vgg16.
    """
    if weights is not None:
        from m2det.io.transfer import finetune_config, read_checkpoint, transfer_weights

        checkpoint = read_checkpoint(weights, preset=name if isinstance(name, str) else None)
        base = name if isinstance(name, ModelConfig) else None
        if isinstance(name, str) and not checkpoint.official:
            base = get_config(name)
        model = M2Det(finetune_config(checkpoint, base, **overrides))
        model.transfer_report = transfer_weights(model, checkpoint)
        return model
    if isinstance(name, ModelConfig):
        return M2Det(with_overrides(name, **overrides))
    return M2Det(get_config(name or "m2det320_vgg16", **overrides))
