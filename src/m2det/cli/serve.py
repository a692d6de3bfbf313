"""`m2det serve`: an HTTP detection service (FastAPI + uvicorn) for one model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from m2det.cli.common import user_errors
from m2det.errors import M2DetError


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


@user_errors
def serve(
    weights: Optional[Path] = typer.Option(
        None, help="Our .safetensors model, or an official .pth with --preset."
    ),
    preset: Optional[str] = typer.Option(None, help="Architecture for an official .pth (or random weights)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    score: Optional[float] = typer.Option(
        None,
        min=0.0,
        max=1.0,
        help="Lowest score returned, after NMS (default: the settings'; clients filter with ?min_score=).",
    ),
    settings: str = typer.Option("paper", help="Post-processing: paper or official."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
) -> None:
    """Serve detections over HTTP: POST an image body to /detect; GET /model, /health."""
    try:
        import uvicorn
    except ImportError:
        raise M2DetError("m2det serve needs the serve extras: pip install 'm2det[serve]'") from None
    from m2det.inference.detector import Detector
    from m2det.serve import create_app

    detector = Detector(weights, preset=preset, device=device, score_threshold=score, settings=settings)
    typer.echo(f"serving {detector.model.config.name} on http://{host}:{port} (POST /detect)")
    uvicorn.run(create_app(detector), host=host, port=port, log_level="info")
