"""Pictures of an `Explanation` in the paper's Fig. 6 layout, and the files `m2det explain` writes.

The activation grid has one row per scale (largest first) and one column per level (shallowest
first); each cell is that map upsampled over the image, with the detections drawn on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from m2det.analysis.activations import REDUCTIONS, Explanation
from m2det.engine.plots import save_figure
from m2det.errors import M2DetError
from m2det.io.jsonfile import write_json
from m2det.visualize import draw_detections

NORMALIZATIONS = ("global", "scale")
COLORMAP = "jet"  # the paper's Fig. 6 colours
_CELL_INCHES = 2.4
_DISPLAY_SIDE = 360  # the longest side of the image in each cell, in pixels


def _display_image(image: Tensor) -> Tensor:
    """The image as uint8 RGB, shrunk so that its longest side is `_DISPLAY_SIDE` (a grid of 48 cells
    of a 12-megapixel photo would otherwise take gigabytes)."""
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    image = image.detach().cpu().expand(3, -1, -1)
    height, width = image.shape[-2:]
    factor = min(1.0, _DISPLAY_SIDE / max(height, width))
    if factor < 1.0:
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        image = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)[0]
        image = image.round().clamp(0, 255).to(torch.uint8)
    return image


def _overlay(image: Tensor, heat: Tensor, low: float, high: float) -> Tensor:
    """`heat` [h, w] upsampled over the uint8 RGB `image`, coloured by `COLORMAP` on [low, high], half and half."""
    from matplotlib import colormaps

    size = image.shape[-2:]
    upsampled = F.interpolate(heat[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    scaled = ((upsampled - low) / max(high - low, 1e-12)).clamp(0, 1)
    colors = torch.from_numpy(colormaps[COLORMAP](scaled.numpy())[..., :3]).permute(2, 0, 1).float()
    return (0.5 * image.float() / 255 + 0.5 * colors).clamp(0, 1)


def plot_activations(
    explanation: Explanation,
    image: Tensor,
    path: Union[str, Path],
    *,
    normalize: str = "global",
    scales: Optional[Sequence[int]] = None,
    title: Optional[str] = None,
) -> Path:
    """The Fig. 6 grid as a PNG: rows = `scales` (default all), columns = levels, detections drawn.

    `normalize="global"` puts every cell on one colour scale (the colour bar's), so cells compare
    directly; "scale" normalises each row by its own maximum, so the levels of a scale compare."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if normalize not in NORMALIZATIONS:
        raise M2DetError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    rows = list(range(explanation.num_scales)) if scales is None else [int(s) for s in scales]
    bad = [s for s in rows if not 0 <= s < explanation.num_scales]
    if bad or not rows:
        raise M2DetError(
            f"scales must be among 0..{explanation.num_scales - 1} (0 = the largest map), got {list(scales or [])}"
        )
    shown = _display_image(image)
    height, width = explanation.image_size
    ratio = torch.tensor([shown.shape[-1] / width, shown.shape[-2] / height] * 2)
    dets = explanation.detections
    boxes = dets["boxes"].reshape(-1, 4) * ratio
    cols = explanation.num_levels
    aspect = shown.shape[-2] / shown.shape[-1]
    figure = Figure(
        figsize=(cols * _CELL_INCHES + 1.2, len(rows) * _CELL_INCHES * aspect + 1.0),
        dpi=100,
        layout="constrained",
    )
    grid = figure.subplots(len(rows), cols, squeeze=False)
    everything = torch.cat([explanation.activation[s].flatten() for s in rows])
    low, high = float(everything.min()), float(everything.max())
    for r, scale in enumerate(rows):
        maps = explanation.activation[scale]
        if normalize == "scale":
            low, high = float(maps.min()), float(maps.max())
        for level in range(cols):
            axes = grid[r][level]
            cell = _overlay(shown, maps[level], low, high)
            drawn = draw_detections(cell, boxes, dets["labels"], class_names=explanation.class_names)
            axes.imshow(drawn.permute(1, 2, 0).numpy())
            axes.set_xticks([])
            axes.set_yticks([])
            if r == 0:
                axes.set_title(f"level {level}", fontsize="medium")
            if level == 0:
                h_s, w_s = maps.shape[1:]
                axes.set_ylabel(f"scale {scale} ({h_s}x{w_s})", fontsize="medium")
    what = REDUCTIONS[explanation.reduction]
    if normalize == "global":
        colorbar = ScalarMappable(Normalize(low, high), COLORMAP)
        label = f"{what} of the level's channels"
        how = "one colour scale for all cells"
    else:
        colorbar = ScalarMappable(Normalize(0, 1), COLORMAP)
        label = "fraction of the row's range (min to max)"
        how = "each scale (row) on its own colour scale"
    figure.colorbar(colorbar, ax=grid.ravel().tolist(), shrink=0.8, label=label)
    figure.suptitle(
        title
        or f"{explanation.model_name}: {what} of the classification features\n"
        f"rows: scales (0 = largest map), columns: levels (0 = first TUM)\n{how}",
        fontsize="medium",
    )
    return save_figure(figure, path)


def plot_attention(explanation: Explanation, path: Union[str, Path]) -> Path:
    """SFAM's channel attention as a PNG: the mean weight per (scale, level) as a table, and every
    channel's weight per scale with the level blocks marked."""
    from matplotlib.figure import Figure

    if explanation.attention is None or explanation.channel_attention is None:
        raise M2DetError(f"{explanation.model_name} has no SFAM (mlfpn.sfam is off): no attention to draw")
    table = explanation.attention
    scales, levels = table.shape
    figure = Figure(figsize=(max(9.0, 3 + levels * 1.4), 1.5 + scales * 0.7), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[max(levels, 2), 4])
    image = left.imshow(table.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for scale in range(scales):
        for level in range(levels):
            value = float(table[scale, level])
            left.text(
                level,
                scale,
                f"{value:.2f}",
                ha="center",
                va="center",
                color="white" if value < 0.6 else "black",
            )
    left.set(
        xticks=range(levels),
        yticks=range(scales),
        xlabel="level (0 = first TUM)",
        ylabel="scale (0 = largest map)",
        title="mean weight per level",
    )
    figure.colorbar(image, ax=left, shrink=0.8)
    channels = len(explanation.channel_attention[0])
    for scale, weights in enumerate(explanation.channel_attention):
        right.plot(weights.numpy(), linewidth=0.8, label=f"scale {scale}")
    for level in range(1, levels):
        right.axvline(level * channels / levels, color="grey", linewidth=0.8, linestyle="--")
    right.set(
        xlabel="channel (dashed: level boundaries)", ylabel="weight", ylim=(0, 1), title="every channel"
    )
    right.legend(fontsize="small", ncol=2)
    figure.suptitle(f"{explanation.model_name}: SFAM channel attention per scale (the paper's Eq. 2)")
    return save_figure(figure, path)


def save_explanation(
    explanation: Explanation,
    image: Tensor,
    out_dir: Union[str, Path],
    name: str,
    *,
    normalize: str = "global",
    scales: Optional[Sequence[int]] = None,
    extra: Optional[dict] = None,
) -> dict[str, Path]:
    """Write `NAME_activation.png`, `NAME_attention.png` (with SFAM) and `NAME_explain.json` (the
    numbers, `Explanation.to_dict` plus `extra`) into `out_dir`, each atomically; returns the paths."""
    out = Path(out_dir)
    data = {**(extra or {}), "normalize": normalize, **explanation.to_dict()}  # before any file is written
    activation = plot_activations(
        explanation, image, out / f"{name}_activation.png", normalize=normalize, scales=scales
    )
    written = {"activation": activation}
    if explanation.attention is not None:
        written["attention"] = plot_attention(explanation, out / f"{name}_attention.png")
    written["json"] = write_json(out / f"{name}_explain.json", data, indent=1)
    return written
