"""`m2det convert`: an official M2Det `.pth` to our safetensors + config file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from m2det.cli.common import parse_overrides, user_errors


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)


@user_errors
def convert(
    source: Path = typer.Argument(..., help="Official checkpoint, e.g. m2det512_vgg.pth."),
    output: Path = typer.Argument(..., help="Where to write our model file (.safetensors)."),
    preset: str = typer.Option(
        ..., "--preset", help="Preset the checkpoint was trained as, e.g. m2det512_vgg16."
    ),
    num_classes: Optional[int] = typer.Option(
        None, help="Classes incl. background; read from the checkpoint if omitted."
    ),
    sfam: Optional[bool] = typer.Option(
        None, "--sfam/--no-sfam", help="Override; read from the checkpoint if omitted."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Config override KEY=VALUE, e.g. mlfpn.num_levels=4 (repeatable)."
    ),
) -> None:
    """Convert an official checkpoint (loaded with weights_only=True) and verify it loads strictly."""
    from m2det.io.checkpoint import save_model
    from m2det.io.official import build_official_model

    settings = parse_overrides(overrides)
    if num_classes is not None:
        settings["num_classes"] = num_classes
    if sfam is not None:
        settings["mlfpn.sfam"] = sfam
    model = build_official_model(source, preset, **settings)
    save_model(model, output, extra={"converted_from": source.name})
    config = model.config
    typer.echo(
        f"wrote {output} ({preset}, {config.num_classes} classes, SFAM {'on' if config.mlfpn.sfam else 'off'})"
    )
