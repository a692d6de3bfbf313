"""The paper's Fig. 6 as tensors: how strongly each level of each pyramid scale fires on an image.

What is measured: the features the classification convs read (the head's inputs, after SFAM and
the norm), split into the levels they came from. At every scale the head's input holds the levels
side by side, level k (0 = the first, shallowest TUM) in channels `[k * planes, (k + 1) * planes)`,
so one map per (scale, level) is that channel block reduced at each cell. The paper does not say
how it reduced the channels; the default is the L2 norm (non-negative whatever the sign, which
matters at the largest scale, where a BatchNorm follows SFAM), the mean and the max are the others.

The features are read with a forward pre-hook on the head (and a forward hook on SFAM for its
attention), so the network runs its own forward unchanged, once, through the same
`DetectionPipeline` as `Detector`: the detections are the ones `m2det detect` finds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from m2det.boxes.postprocess import PostprocessSettings, get_settings
from m2det.errors import M2DetError
from m2det.inference.detector import Detector, ImageInput
from m2det.inference.network import Network
from m2det.inference.pipeline import DetectionPipeline
from m2det.io.image import to_rgb_tensor
from m2det.models.m2det import M2Det, config_anchors

# How a level's channel block becomes one value per cell (see the module docstring).
REDUCTIONS: dict[str, str] = {
    "l2": "L2 norm",
    "mean": "mean",
    "max": "max",
}


def reduce_levels(feature: Tensor, num_levels: int, reduction: str = "l2") -> Tensor:
    """One scale's head input `[C, H, W]` -> `[num_levels, H, W]`: each level's channel block reduced."""
    if reduction not in REDUCTIONS:
        raise M2DetError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    channels = feature.shape[0]
    if channels % num_levels:
        raise M2DetError(
            f"the head's input has {channels} channels, which do not split into num_levels={num_levels} "
            "equal blocks (expected channels = levels x planes)"
        )
    blocks = feature.unflatten(0, (num_levels, channels // num_levels))  # [L, planes, H, W]
    if reduction == "l2":
        return torch.linalg.vector_norm(blocks, dim=1)
    if reduction == "mean":
        return blocks.mean(dim=1)
    return blocks.amax(dim=1)


@dataclass
class MapPeak:
    """Where one (scale, level) map is strongest: its value, its cell, and that cell's centre in image pixels."""

    value: float
    row: int
    col: int
    x: float
    y: float


@dataclass
class Explanation:
    """What `explain` found for one image; scales are largest first, levels shallowest first (0-based).

    * `activation[scale]`: `[num_levels, H_s, W_s]`, the reduced head input of each level;
    * `attention`: `[num_scales, num_levels]`, SFAM's sigmoid weights averaged over each level's
      channels (None for a model without SFAM), and `channel_attention[scale]` all `C` of them;
    * `detections`: `boxes` (xyxy, image pixels), `scores`, `labels` (1-based), `label_names`;
    * `cell_centers[scale]`: `[H_s, W_s, 2]` (x, y) of each cell's anchors in image pixels.
    """

    activation: list[Tensor]
    attention: Optional[Tensor]
    channel_attention: Optional[list[Tensor]]
    detections: dict[str, Any]
    cell_centers: list[Tensor]
    image_size: tuple[int, int]  # (H, W) of the original image
    input_size: int  # the square size the network ran at
    reduction: str
    model_name: str
    class_names: list[str]  # foreground names: label l is class_names[l - 1]

    @property
    def num_scales(self) -> int:
        return len(self.activation)

    @property
    def num_levels(self) -> int:
        return int(self.activation[0].shape[0])

    def peak(self, scale: int, level: int) -> MapPeak:
        """The strongest cell of the map of (`scale`, `level`) (the first one on ties, row-major)."""
        heat = self.activation[scale][level]
        index = int(torch.argmax(heat))
        row, col = divmod(index, heat.shape[1])
        x, y = self.cell_centers[scale][row, col].tolist()
        return MapPeak(float(heat[row, col]), row, col, x, y)

    def box_activation(self, box: Sequence[float]) -> Tensor:
        """`[num_scales, num_levels]`: each map's strongest value over the cells whose centre lies in
        the xyxy pixel `box` (for a box smaller than a cell, the cell nearest the box's centre); NaN
        for a box with a non-finite corner."""
        x1, y1, x2, y2 = (float(v) for v in box)
        out = torch.full((self.num_scales, self.num_levels), math.nan)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):  # a diverged model's box: it covers no cell
            return out
        for scale, (heat, centers) in enumerate(zip(self.activation, self.cell_centers)):
            cx, cy = centers[..., 0], centers[..., 1]
            inside = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
            if not bool(inside.any()):
                distance = (cx - (x1 + x2) / 2) ** 2 + (cy - (y1 + y2) / 2) ** 2
                inside = distance == distance.min()
            out[scale] = heat[:, inside].amax(dim=1)
        return out

    def strongest(self, box: Sequence[float]) -> Optional[tuple[int, int, float]]:
        """(scale, level, value) of the map that fires most inside `box`: "it fires at level k of
        scale s"; None for a box with a non-finite corner."""
        values = self.box_activation(box)
        if bool(values.isnan().all()):
            return None
        index = int(torch.argmax(values))
        scale, level = divmod(index, self.num_levels)
        return scale, level, float(values[scale, level])

    def to_dict(self) -> dict[str, Any]:
        """The numbers behind the picture, JSON-ready: per scale and level the map's max, mean and
        peak (cell and image pixels), SFAM's mean attention, and per detection where it fires."""
        scales = []
        for scale, heat in enumerate(self.activation):
            levels = []
            for level in range(self.num_levels):
                peak = self.peak(scale, level)
                levels.append(
                    {
                        "level": level,
                        "max": peak.value,
                        "mean": float(heat[level].mean()),
                        "argmax_cell": [peak.row, peak.col],
                        "argmax_xy": [round(peak.x, 2), round(peak.y, 2)],
                    }
                )
            scales.append(
                {
                    "scale": scale,
                    "size": list(heat.shape[1:]),
                    "levels": levels,
                    "attention": None if self.attention is None else self.attention[scale].tolist(),
                }
            )
        detections = []
        for box, score, label in zip(
            self.detections["boxes"].tolist(),
            self.detections["scores"].tolist(),
            self.detections["labels"].tolist(),
        ):
            values = self.box_activation(box)
            found = self.strongest(box)
            detections.append(
                {
                    "box": [round(v, 2) for v in box],
                    "score": round(score, 4),
                    "label": int(label),
                    "name": self.class_names[label - 1],
                    "strongest": None
                    if found is None
                    else {"scale": found[0], "level": found[1], "value": found[2]},
                    "strongest_level_per_scale": None if found is None else values.argmax(dim=1).tolist(),
                    "activation": values.tolist(),  # NaN (null in the JSON) for a non-finite box
                }
            )
        return {
            "model": self.model_name,
            "image_size": list(self.image_size),
            "input_size": self.input_size,
            "reduction": self.reduction,
            "num_scales": self.num_scales,
            "num_levels": self.num_levels,
            "sfam": self.attention is not None,
            "scales": scales,
            "detections": detections,
        }


def explain(
    model: Union[Detector, Network, nn.Module],
    image: ImageInput,
    *,
    reduction: str = "l2",
    settings: Union[str, PostprocessSettings, None] = None,
    score_threshold: Optional[float] = None,
    input_size: Optional[int] = None,
) -> Explanation:
    """Fig. 6 for one image: the activation of every (scale, level), SFAM's attention, the detections.

    Args:
        model: an `M2Det` (ours, or built from an official checkpoint), a `Detector` holding one
            (its settings and first input size are the defaults here), or `optimize_for_inference`'s
            wrapper of one. It runs in eval mode; a model in training mode is put back afterwards.
        image: a path, PIL image, OpenCV-style array or CHW RGB tensor (as `Detector` takes).
        reduction: how a level's channels become one value per cell: "l2" (default), "mean", "max".
        settings, score_threshold: post-processing of the detections (as `Detector`'s).
        input_size: the square size the network runs at (default: the model's own).
    """
    if reduction not in REDUCTIONS:
        raise M2DetError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    network = _eager_model(model)
    if isinstance(model, Detector):
        settings = settings if settings is not None else model.settings
        input_size = input_size or model.sizes[0]
    chosen = get_settings(settings if settings is not None else "paper")
    if score_threshold is not None:
        chosen = chosen.replace(score_threshold=float(score_threshold), min_score=float(score_threshold))
    size = int(input_size or network.input_size)
    pipeline = DetectionPipeline(network, chosen, sizes=[size])
    rgb = to_rgb_tensor(image, "image").to(network.device)
    height, width = int(rgb.shape[-2]), int(rgb.shape[-1])

    captured: dict[str, list[Tensor]] = {}

    def grab_head_inputs(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured["features"] = [f[0].detach().float().cpu() for f in args[0]]

    def grab_attention(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        weights = module.channel_weights(args[0])  # type: ignore[operator]
        captured["attention"] = [w[0].detach().float().cpu().flatten() for w in weights]

    handles = [network.head.register_forward_pre_hook(grab_head_inputs)]
    sfam = getattr(getattr(network, "mlfpn", None), "sfam", None)
    if sfam is not None:
        handles.append(sfam.register_forward_hook(grab_attention))
    was_training = network.training
    network.eval()
    try:
        found = pipeline([rgb])[0]
    finally:
        for handle in handles:
            handle.remove()
        network.train(was_training)

    num_levels = int(network.config.mlfpn.num_levels)
    activation = [reduce_levels(f, num_levels, reduction) for f in captured["features"]]
    attention: Optional[Tensor] = None
    channel_attention = captured.get("attention")
    if channel_attention is not None:
        attention = torch.stack([w.unflatten(0, (num_levels, -1)).mean(dim=1) for w in channel_attention])
    return Explanation(
        activation=activation,
        attention=attention,
        channel_attention=channel_attention,
        detections={k: v.cpu() if isinstance(v, Tensor) else v for k, v in found.items()},
        cell_centers=_cell_centers(network, size, [a.shape[1:] for a in activation], (height, width)),
        image_size=(height, width),
        input_size=size,
        reduction=reduction,
        model_name=network.config.name,
        class_names=list(network.config.categories[1:]),
    )


def _eager_model(model: Any) -> M2Det:
    """The eager `M2Det` behind what `explain` was given; hooks need its modules."""
    network = model.network if isinstance(model, Detector) else model
    inner = getattr(network, "model", None)  # `optimize_for_inference` wraps the M2Det
    if not isinstance(network, M2Det) and isinstance(inner, M2Det):
        network = inner
    if not isinstance(network, M2Det):
        raise M2DetError(
            f"explain reads the features inside the PyTorch M2Det, got {type(network).__name__}; "
            "load the .safetensors model (or the official .pth with its preset) instead of an export"
        )
    return network


def _cell_centers(
    model: M2Det, input_size: int, map_sizes: Sequence[Sequence[int]], image_size: tuple[int, int]
) -> list[Tensor]:
    """Per scale `[H_s, W_s, 2]`: the (x, y) centre of each cell's anchors in the original image's pixels.

    The anchors place the cells (with the official steps they are not exactly `input / H_s` apart),
    so the centres come from them, not from a second formula."""
    anchors = config_anchors(model.config, input_size)
    per_location = model.config.anchors.num_anchors_per_location
    height, width = image_size
    centers, start = [], 0
    for h, w in map_sizes:
        cells = anchors[start : start + h * w * per_location : per_location, :2]
        start += h * w * per_location
        centers.append((cells * cells.new_tensor([width, height])).reshape(h, w, 2))
    return centers
