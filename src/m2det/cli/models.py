"""`m2det models`: the named presets with their size and cost; `--variants`: the paper's Table 2."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer

from m2det.cli.common import user_errors

if TYPE_CHECKING:
    from m2det.config import ModelConfig

# the bases `--variants` lists by default: Table 2's 320 and the 512 the paper also trains, and the CPU-sized one
VARIANT_BASES = ("m2det320_vgg16", "m2det512_vgg16", "m2det_tiny")


def register(app: typer.Typer) -> None:
    app.command("models")(models)


def pyramid_summary(config: ModelConfig) -> str:
    """The pyramid in a few words: `8 x 256 TUM`, `8 x 256 s-TUM, base once`, `SSD`, `SSD + deconv`."""
    m = config.mlfpn
    if m.kind == "ssd":
        return "SSD"
    if m.kind == "ssd_deconv":
        return f"SSD + deconv {m.planes}"
    summary = f"{m.num_levels} x {m.planes} {'TUM' if m.smooth else 's-TUM'}"
    return summary if m.base_every_level else summary + ", base once"


@user_errors
def models(
    num_classes: int = typer.Option(81, help="Classes including background (81 = COCO)."),
    variants: bool = typer.Option(
        False,
        "--variants",
        help="List the paper's Table 2 ablation variants (see docs/architecture.md) instead.",
    ),
    base: Optional[list[str]] = typer.Option(
        None, "--base", help=f"With --variants: the preset(s) to vary (default {', '.join(VARIANT_BASES)})."
    ),
) -> None:
    """List the model presets (or with --variants Table 2's variants) with parameters and GFLOPs at their input size."""
    from rich.console import Console
    from rich.table import Table

    from m2det.boxes.anchors import num_anchors
    from m2det.config import get_config, list_presets
    from m2det.models import pyramid_sizes
    from m2det.models.complexity import measure
    from m2det.models.variants import list_variants, variant_config

    first = "variant" if variants else "preset"
    table = Table(title=f"M2Det {'Table 2 variants' if variants else 'presets'} ({num_classes} classes)")
    for column in (first, "backbone", "input", "pyramid", "SFAM", "anchors", "params (M)", "GFLOPs"):
        table.add_column(column, justify="left" if column in (first, "backbone", "pyramid") else "right")
    if variants:
        configs = [
            variant_config(name, variant, num_classes=num_classes)
            for name in (base or VARIANT_BASES)
            for variant in list_variants()
        ]
    else:
        configs = [get_config(name, num_classes=num_classes) for name in list_presets()]
    for config in configs:
        cost = measure(config)
        anchors = num_anchors(pyramid_sizes(config), config.anchors.num_anchors_per_location)
        table.add_row(
            config.name,
            config.backbone.name,
            str(config.input_size),
            pyramid_summary(config),
            "on" if config.mlfpn.sfam else "off",
            f"{anchors:,}",
            f"{cost.params / 1e6:.2f}",
            f"{cost.gflops:.1f}",
        )
    Console(width=max(Console().width, 120)).print(table)
