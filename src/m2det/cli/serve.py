"""`m2det serve`: an HTTP detection service (FastAPI + uvicorn) for one model."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

from m2det.cli.common import PRECISION_HELP, user_errors
from m2det.errors import M2DetError


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@user_errors
def serve(
    weights: Optional[Path] = typer.Option(
        None, help="Our .safetensors model, an official .pth with --preset, or an export (.onnx, .xml)."
    ),
    preset: Optional[str] = typer.Option(None, help="Architecture for an official .pth (or random weights)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    backend: Optional[str] = typer.Option(
        None,
        help="pytorch | onnxruntime | openvino (default: the --weights file's: .onnx onnxruntime, .xml "
        "openvino; openvino with a .safetensors converts it in memory).",
    ),
    score: float = typer.Option(
        0.3,
        min=0.0,
        max=1.0,
        help="Lowest score in an answer unless the request asks ?min_score= (as m2det detect's --score); "
        "requests may go down to the post-processing's candidate floor (0.05 for paper).",
    ),
    settings: str = typer.Option("paper", help="Post-processing: paper or official."),
    precision: Optional[str] = typer.Option(None, help=PRECISION_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None,
        envvar="M2DET_API_KEY",
        help="Key that /detect, /model and /metrics need (Authorization: Bearer KEY or X-API-Key: KEY).",
    ),
    cors_origin: Optional[list[str]] = typer.Option(
        None, help="An origin whose web pages may call the API (repeatable; default: CORS off)."
    ),
    max_batch: int = typer.Option(8, min=1, help="Images per forward pass (1: no batching)."),
    max_wait_ms: float = typer.Option(
        5.0, min=0.0, help="Milliseconds the first image of a batch waits for others."
    ),
    max_in_flight: int = typer.Option(
        32, min=1, help="/detect requests at once; more get 503 + Retry-After."
    ),
    max_body_mb: float = typer.Option(32.0, min=0.001, help="Largest request body, MiB (413 over it)."),
    max_pixels: float = typer.Option(
        40.0, min=0.001, help="Most megapixels an image may declare (413 over it; checked before decoding)."
    ),
    header_timeout: float = typer.Option(10.0, min=0.1, help="Seconds to send a request's headers."),
    body_timeout: float = typer.Option(30.0, min=0.1, help="Seconds to send a body (408 after)."),
    request_timeout: float = typer.Option(60.0, min=0.1, help="Seconds for a whole /detect (503 after)."),
    keep_alive: int = typer.Option(5, min=1, help="Seconds an idle keep-alive connection stays open."),
    max_connections: int = typer.Option(1000, min=1, help="Open connections at once (503 beyond)."),
) -> None:
    """Serve detections over HTTP: POST an image to /detect; GET /model, /health, /metrics, /docs."""
    try:
        import uvicorn
    except ImportError:
        raise M2DetError("m2det serve needs the serve extras: pip install 'm2det[serve]'") from None
    from m2det.inference.detector import Detector
    from m2det.serve import ServeConfig, create_app
    from m2det.serve.server import ServerLimits, server_config

    if api_key is not None and not api_key.strip():
        raise M2DetError("--api-key (or M2DET_API_KEY) is empty")
    if not is_loopback(host) and api_key is None:
        typer.echo(
            f"warning: listening on {host} without an API key: anyone who reaches this port can use the "
            "model (set --api-key or M2DET_API_KEY)",
            err=True,
        )
    config = ServeConfig(
        max_image_bytes=int(max_body_mb * 1024 * 1024),
        max_pixels=int(max_pixels * 1e6),
        max_in_flight=max_in_flight,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        body_timeout_s=body_timeout,
        request_timeout_s=request_timeout,
        min_score=score,
        api_key=api_key,
        cors_origins=tuple(cors_origin or ()),
    )
    detector = Detector(
        weights,
        preset=preset,
        device=device,
        settings=settings,
        batch_size=max_batch,
        precision=precision,
        backend=backend,
    )
    typer.echo(f"serving {detector.model.config.name} on http://{host}:{port} (POST /detect, docs at /docs)")
    limits = ServerLimits(
        header_timeout_s=header_timeout, keep_alive_s=keep_alive, max_connections=max_connections
    )
    uvicorn.Server(server_config(create_app(detector, config=config), host, port, limits)).run()
