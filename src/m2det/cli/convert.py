"""`m2det convert`: an official M2Det `.pth` to our safetensors + config file; `m2det convert-backbone`:
ImageNet weights to the backbone M2Det trains from (SSD's reduced VGG16, ResNet-101)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from m2det.cli.common import parse_overrides, user_errors
from m2det.errors import M2DetError


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
    app.command("convert-backbone")(convert_backbone)


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
    from m2det.models.loading import build_official_model

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


@user_errors
def convert_backbone(
    source: Path = typer.Argument(
        ...,
        help="ImageNet weights: torchvision's VGG16 or ResNet-101 state dict, or the official vgg16_reducedfc.pth.",
    ),
    output: Path = typer.Argument(
        ...,
        help="Where to write the backbone: .safetensors (our names) or .pth (VGG16: the official "
        "vgg16_reducedfc.pth layout, keys 0.weight ... 33.bias).",
    ),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="vgg16 or resnet101; read from the file's keys if omitted."
    ),
) -> None:
    """Convert ImageNet weights to the backbone M2Det uses, checked by loading them strictly.

    VGG16: fc6/fc7 become the dilated conv6 (3x3, 1024) and conv7 (1x1, 1024) of SSD's reduced VGG16
    by subsampling (every 4th unit; fc6's 7x7 taken at 3x3); the 1000-class fc8 is dropped. The
    result loads with `m2det train --backbone-weights`.
    """
    import torch
    from safetensors.torch import save_file

    from m2det.io.atomic import atomic_path
    from m2det.io.torchfile import load_state_dict_file
    from m2det.models.backbones import (
        TinyBackbone,
        backbone_class,
        convert_backbone_state,
        infer_backbone_name,
        load_backbone_state,
    )

    if output.suffix not in (".safetensors", ".pth", ".pt"):
        raise M2DetError(f"{output}: write a .safetensors or a .pth file")
    state = load_state_dict_file(source)
    name = backbone or infer_backbone_name(state)
    cls = backbone_class(name)
    if cls is TinyBackbone:
        raise M2DetError("the tiny backbone has no ImageNet weights to convert")
    converted, notes = convert_backbone_state(state, name)
    load_backbone_state(cls(), converted, str(source))  # strict: raises with what does not fit
    tensors = {k: v.contiguous() for k, v in converted.items()}
    with atomic_path(output) as tmp:
        if output.suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata={"format": "m2det-backbone", "backbone": name})
        else:
            if name == "vgg16":
                tensors = {k.removeprefix("features."): v for k, v in tensors.items()}
            torch.save(tensors, tmp)
    for note in notes:
        typer.echo(note)
    typer.echo(f"wrote {output} ({name}, {len(tensors)} tensors)")
