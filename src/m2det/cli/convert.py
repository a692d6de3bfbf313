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
    from m2det.config import get_config
    from m2det.data.names import COCO_CLASSES
    from m2det.io.checkpoint import save_model
    from m2det.io.official import load_official, official_num_classes
    from m2det.io.torchfile import load_state_dict_file
    from m2det.models import build_model

    state = load_state_dict_file(source)
    extra = parse_overrides(overrides)
    base = get_config(preset, **extra)
    classes = num_classes or official_num_classes(state, base.anchors.num_anchors_per_location)
    use_sfam = sfam if sfam is not None else any(k.startswith("sfam_module.") for k in state)
    settings = {**extra, "num_classes": classes, "mlfpn.sfam": use_sfam}
    if classes == len(COCO_CLASSES) + 1:
        settings["class_names"] = list(COCO_CLASSES)
    model = build_model(get_config(preset, **settings))
    load_official(model, state)
    save_model(model, output, extra={"converted_from": source.name})
    typer.echo(f"wrote {output} ({preset}, {classes} classes, SFAM {'on' if use_sfam else 'off'})")
