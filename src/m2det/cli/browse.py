"""`m2det browse-data`: write a few augmented training samples with their boxes drawn, to check data first."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from m2det.cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("browse-data")(browse_data)


@user_errors
def browse_data(
    data: Path = typer.Argument(
        ...,
        help="A COCO .json, a Pascal VOC folder, a YOLO data .yaml or a folder of images with VOC XML "
        "files beside them.",
    ),
    split: str = typer.Option(
        "train", help="VOC ImageSets/Main file, YOLO entry or image subfolder (train, val, test)."
    ),
    num: int = typer.Option(8, "--num", min=1, help="How many samples to write."),
    out: Path = typer.Option(Path("browse-data"), "--out", help="Folder to write the images to."),
    size: int = typer.Option(320, "--size", min=1, help="Input size the samples are resized to."),
    seed: int = typer.Option(0, "--seed", help="Picks the images and the augmentation."),
    augment: bool = typer.Option(
        True, "--augment/--no-augment", help="Training augmentation, or resize only."
    ),
    image_dir: Optional[Path] = typer.Option(None, "--image-dir", help="COCO only: the image folder."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first problem in the data."),
) -> None:
    """Write NUM samples as PNG with boxes and class names drawn, and print where they are."""
    import torch

    from m2det.data import build_dataset, build_eval_transform, build_train_transform
    from m2det.io.image import write_png
    from m2det.visualize import draw_detections

    transform = build_train_transform(size) if augment else build_eval_transform(size)
    dataset = build_dataset(data, split, strict=strict, transforms=transform, image_dir=image_dir)
    counts = ", ".join(f"{name} {n}" for name, n in dataset.box_counts().items())
    typer.echo(f"{data} [{split}]: {len(dataset)} images; boxes per class: {counts}")
    if dataset.report.issues:
        typer.echo(f"{len(dataset.report.issues)} problem(s) in the data, listed above")

    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, index in enumerate(indices):
        image, target = dataset[index]
        drawn = draw_detections(
            image.as_subclass(torch.Tensor),
            target["boxes"].as_subclass(torch.Tensor),
            target["labels"],
            class_names=dataset.class_names,
        )
        path = out / f"{k:02d}_{dataset.image_info(index).path.stem}.png"
        write_png(path, drawn)
        written.append(path)
    typer.echo(f"wrote {len(written)} sample(s) of {size}x{size} to {out.resolve()}")
