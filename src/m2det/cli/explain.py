"""`m2det explain IMAGE --weights MODEL`: the paper's Fig. 6 for one image.

Writes into `--out` (default: a fresh `runs/explain/expN`) `NAME_activation.png` (rows = scales,
columns = levels, each map over the image with the detections), `NAME_attention.png` (SFAM's
channel attention per scale and level, for a model with SFAM) and `NAME_explain.json` (the numbers:
each map's max, mean and peak, and for each detection the scale and level firing most inside it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from m2det.cli.common import next_run_dir, user_errors
from m2det.cli.detect import DEFAULT_SCORE
from m2det.errors import M2DetError


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)


def parse_scales(text: Optional[str]) -> Optional[list[int]]:
    """`--scales` text such as "0,2" as scale indexes (None: all)."""
    if text is None or not text.strip():
        return None
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise M2DetError(
            f"--scales expects scale indexes separated by commas (e.g. 0,1,2), got {text!r}"
        ) from None


@user_errors
def explain(
    image: Path = typer.Argument(..., help="The image to explain."),
    weights: Optional[Path] = typer.Option(
        None, "--weights", "-w", help="Our .safetensors model file, or an official .pth with --preset."
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="Architecture of an official .pth (or of random weights), e.g. m2det512_vgg16."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output folder (default: a fresh runs/explain/expN)."
    ),
    score: float = typer.Option(
        DEFAULT_SCORE, "--score", min=0.0, max=1.0, help="Lowest score of the detections drawn and listed."
    ),
    scales: Optional[str] = typer.Option(
        None, "--scales", help="The scales drawn as rows, e.g. 0,1,2 (0 = the largest map; default: all)."
    ),
    reduction: str = typer.Option(
        "l2", "--reduction", help="How a level's channels become one value per cell: l2 | mean | max."
    ),
    normalize: str = typer.Option(
        "global", "--normalize", help="Colour scale: global (one for all cells) | scale (one per row)."
    ),
    size: Optional[int] = typer.Option(
        None, "--size", min=32, help="Square input size to run at (default: the model's)."
    ),
    settings: str = typer.Option("paper", "--settings", help="Post-processing: paper | official."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
) -> None:
    """Fig. 6: which scale and level of the pyramid fire where, as a picture and JSON."""
    import warnings

    from m2det.analysis.activations import REDUCTIONS
    from m2det.analysis.activations import explain as explain_image
    from m2det.analysis.figures import NORMALIZATIONS, save_explanation
    from m2det.device import resolve_device
    from m2det.inference.network import load_network
    from m2det.io.image import read_image

    if reduction not in REDUCTIONS:
        raise M2DetError(f"--reduction must be one of {' | '.join(REDUCTIONS)}, got {reduction!r}")
    if normalize not in NORMALIZATIONS:
        raise M2DetError(f"--normalize must be one of {' | '.join(NORMALIZATIONS)}, got {normalize!r}")
    if weights is not None and not weights.is_file():
        raise M2DetError(f"--weights {weights}: file not found")
    if weights is not None and weights.suffix == ".onnx":
        raise M2DetError(
            f"--weights {weights}: explain reads features inside the PyTorch model, not an .onnx export"
        )
    rows = parse_scales(scales)
    pixels = read_image(image)  # a missing or unreadable image fails here, before the model loads
    if weights is None:
        typer.secho(
            "warning: no --weights given: the model has RANDOM weights and its maps mean nothing",
            err=True,
            fg=typer.colors.YELLOW,
            bold=True,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no weights given")
        network = load_network(weights, preset, resolve_device(device))
    num_scales = network.config.mlfpn.num_scales
    if rows is not None and not all(0 <= s < num_scales for s in rows):
        raise M2DetError(
            f"--scales: the model has scales 0..{num_scales - 1} (0 = the largest map), got {scales}"
        )
    found = explain_image(
        network, pixels, reduction=reduction, settings=settings, score_threshold=score, input_size=size
    )
    out_dir = out if out is not None else next_run_dir(Path("runs") / "explain")
    extra = {"image": str(image), "weights": None if weights is None else str(weights), "score": score}
    written = save_explanation(
        found, pixels, out_dir, image.stem, normalize=normalize, scales=rows, extra=extra
    )
    dets = found.detections
    for box, score_value, label in zip(
        dets["boxes"].tolist(), dets["scores"].tolist(), dets["labels"].tolist()
    ):
        strongest = found.strongest(box)
        corners = ", ".join(f"{v:.0f}" for v in box)
        where = (
            "not finite" if strongest is None else f"strongest at scale {strongest[0]}, level {strongest[1]}"
        )
        typer.echo(f"{found.class_names[label - 1]} {score_value:.2f} [{corners}]: {where}")
    typer.echo(
        f"{len(found.detections['boxes'])} detections; wrote " + ", ".join(str(p) for p in written.values())
    )
