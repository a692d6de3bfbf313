"""`m2det models`: the named presets with their size and cost."""

from __future__ import annotations

import typer

from m2det.cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("models")(models)


@user_errors
def models(
    num_classes: int = typer.Option(81, help="Classes including background (81 = COCO)."),
) -> None:
    """List the model presets with parameters and GFLOPs at their input size."""
    from rich.console import Console
    from rich.table import Table

    from m2det.boxes.anchors import num_anchors
    from m2det.config import get_config, list_presets
    from m2det.models import pyramid_sizes
    from m2det.models.complexity import measure

    table = Table(title=f"M2Det presets ({num_classes} classes)")
    for column in ("preset", "backbone", "input", "TUMs x planes", "SFAM", "anchors", "params (M)", "GFLOPs"):
        table.add_column(column, justify="left" if column in ("preset", "backbone") else "right")
    for name in list_presets():
        config = get_config(name, num_classes=num_classes)
        cost = measure(config)
        anchors = num_anchors(pyramid_sizes(config), config.anchors.num_anchors_per_location)
        table.add_row(
            name,
            config.backbone.name,
            str(config.input_size),
            f"{config.mlfpn.num_levels} x {config.mlfpn.planes}",
            "on" if config.mlfpn.sfam else "off",
            f"{anchors:,}",
            f"{cost.params / 1e6:.2f}",
            f"{cost.gflops:.1f}",
        )
    Console(width=max(Console().width, 120)).print(table)
