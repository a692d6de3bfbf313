"""The FastAPI application: one loaded `Detector` answering `POST /detect` with JSON detections.

The image travels as the raw request body (a JPEG, PNG, BMP, TIFF, WebP, ... file's bytes:
`curl --data-binary @street.jpg localhost:8000/detect`) or as the field `file` of a multipart form
(`curl -F file=@street.jpg localhost:8000/detect`). It is decoded by the rule every part of m2det
reads images by (`m2det.io.image`: EXIF orientation applied, so `width`/`height` and the boxes are
those of the upright image).

What a request may cost is bounded (`ServeConfig`; docs/serve.md): the body's bytes (checked from
Content-Length up front and as it streams in), the seconds to send it, the pixels its header
declares (before anything is decoded), the requests in flight (then 503 with Retry-After) and
the seconds a whole request may take. An image much larger than the network input is decoded at
1/2, 1/4 or 1/8 of its size (boxes still come back in its own pixels).

One worker thread owns the model (`BatchWorker`): requests queue their decoded images and the
worker runs up to `max_batch` of them in one forward pass, waiting at most `max_wait_ms` for a
batch to fill. `/health` and `/metrics` are answered by the event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Optional

import anyio
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor

from m2det.inference.detector import Detector
from m2det.inference.results import detection_records
from m2det.io.image import (
    MAX_IMAGE_PIXELS,
    ImageReadError,
    ImageTooLarge,
    UnsupportedImage,
    decode_image,
    image_size,
    reduce_factor,
)
from m2det.serve.batching import BatchWorker, Timing
from m2det.serve.metrics import CONTENT_TYPE, Metrics
from m2det.serve.multipart import MultipartError, boundary_of, multipart_file
from m2det.serve.page import mount_page

MAX_IMAGE_BYTES = 32 * 1024 * 1024
# What `m2det detect` writes and draws by default (its --score): the answer's default filter.
DEFAULT_MIN_SCORE = 0.3
SOURCE = "request body"
HINT = (
    "send the image file's bytes as the body (curl --data-binary @image.jpg URL) "
    "or as the multipart field 'file' (curl -F file=@image.jpg URL)"
)

log = logging.getLogger("m2det.serve")


@dataclass(frozen=True)
class ServeConfig:
    """What the service allows; every limit has an option of `m2det serve` (docs/serve.md).

    max_image_bytes: the largest request body (413 over it).
    max_pixels: the most pixels an image's header may declare (413 over it; decoded only under it).
    max_in_flight: /detect requests received, decoded or queued at once (503 + Retry-After over it).
    max_batch: images per forward pass (1: no batching).
    max_wait_ms: how long the first image of a batch waits for others to join it.
    body_timeout_s: seconds to send the body once the headers are in (408 after).
    request_timeout_s: seconds for a whole /detect, body to answer (503 when the model is that busy).
    min_score: the answer's score filter when the request gives no ?min_score=.
    api_key: when set, /detect, /model and /metrics need it (`Authorization: Bearer KEY` or
        `X-API-Key: KEY`; 401 without); /health and /docs stay open.
    cors_origins: origins whose web pages may call the API from a browser (none: CORS off).
    decode_threads: images decoded at once (each may hold up to max_pixels x 3 bytes).
    """

    max_image_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    max_in_flight: int = 32
    max_batch: int = 8
    max_wait_ms: float = 5.0
    body_timeout_s: float = 30.0
    request_timeout_s: float = 60.0
    min_score: float = DEFAULT_MIN_SCORE
    api_key: Optional[str] = None
    cors_origins: tuple[str, ...] = ()
    decode_threads: int = max(1, min(4, os.cpu_count() or 1))


class _ClientGone(Exception):
    """The client closed its connection before its body was in."""


class _MetricsMiddleware:
    """Counts every answer by path and status code (pure ASGI: streaming bodies pass untouched)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(scope["path"], status["code"])


def create_app(
    detector: Detector, max_image_bytes: Optional[int] = None, config: Optional[ServeConfig] = None
) -> FastAPI:
    """Build the app for one detector (`config`: the limits; `max_image_bytes` overrides its own)."""
    config = config or ServeConfig()
    if max_image_bytes is not None:
        config = replace(config, max_image_bytes=int(max_image_bytes))
    metrics = Metrics()
    # the network's input size: images this much larger are decoded reduced
    input_side = max(detector.sizes)

    def run_batch(images: Sequence[Tensor]) -> list[dict]:
        return detector.detect(images)

    worker = BatchWorker(
        run_batch, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000, on_batch=metrics.batch
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(
        title="m2det",
        description="M2Det object detection: POST an image to /detect.",
        docs_url=None,  # served below from local files: no CDN
        redoc_url=None,
        lifespan=lifespan,
    )
    mount_page(app)  # the web page at /: pick an image, see its detections drawn
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.config = config
    state = {"in_flight": 0}
    limiter: dict[str, anyio.CapacityLimiter] = {}

    bearer = HTTPBearer(auto_error=False, description="the server's API key (m2det serve --api-key)")
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")

    def require_key(
        credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
        header_key: Optional[str] = Depends(key_header),
    ) -> None:
        if config.api_key is None:
            return
        given = header_key or (credentials.credentials if credentials is not None else "")
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise HTTPException(
                401,
                "missing or wrong API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    guarded = [Depends(require_key)]

    @app.get("/health")
    async def health() -> dict[str, str]:  # on the event loop: no thread needed, fast under load
        return {"status": "ok"}

    @app.get("/model", dependencies=guarded)
    def model_info() -> dict[str, Any]:
        model_config = detector.model.config
        return {
            "name": model_config.name,
            "input_size": detector.model.input_size,
            "num_classes": model_config.num_classes,
            "class_names": detector.class_names,
            "device": str(detector.device),
            # what runs the network: M2Det (PyTorch), OnnxRuntimeNetwork or OpenVinoNetwork
            "runtime": type(detector.network).__name__,
            "score_threshold": detector.settings.score_threshold,
            "min_score": config.min_score,
            "max_batch": config.max_batch,
            "max_image_bytes": config.max_image_bytes,
            "max_pixels": config.max_pixels,
        }

    @app.get("/metrics", dependencies=guarded, response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        text = metrics.render(worker.queue_depth, state["in_flight"])
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    async def read_body(request: Request, timeout: float) -> bytes:
        limit = config.max_image_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise HTTPException(400, f"Content-Length {length!r} is not a number")
            if int(length) > limit:
                raise _too_large(f"body of {int(length)} bytes exceeds the limit of {limit} bytes")
        body = bytearray()

        async def pull() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise _too_large(f"body exceeds the limit of {limit} bytes")

        try:
            await asyncio.wait_for(pull(), timeout)
        except asyncio.TimeoutError:
            raise HTTPException(
                408,
                f"the body was not sent within {timeout:g} s ({len(body)} bytes came)",
                headers={"Connection": "close"},
            ) from None
        except ClientDisconnect:
            raise _ClientGone() from None
        return bytes(body)

    def decode(body: bytes) -> tuple[Tensor, tuple[int, int]]:
        width, height = image_size(body, max_pixels=config.max_pixels, source=SOURCE)
        reduce = reduce_factor(width, height, 2 * input_side)
        return decode_image(body, SOURCE, max_pixels=config.max_pixels, reduce=reduce), (width, height)

    @app.post(
        "/detect",
        dependencies=guarded,
        openapi_extra={"requestBody": _REQUEST_BODY},
        responses={
            400: {"description": "empty or damaged image, bad multipart form"},
            401: {"description": "missing or wrong API key"},
            408: {"description": "the body took longer than the body timeout"},
            413: {"description": "body over the byte limit, or image over the pixel limit"},
            415: {"description": "not an image format m2det reads"},
            503: {"description": "too many requests in flight, or the model too busy: retry later"},
        },
    )
    async def detect(
        request: Request,
        min_score: Optional[float] = Query(
            None, ge=0.0, le=1.0, description=f"lowest score returned (default {config.min_score})"
        ),
    ) -> Any:
        """Detections in an image: its upright `width` and `height`, and `detections` (`box`
        [x1, y1, x2, y2] in its pixels, `score`, `label`, `name`); `decode_ms`, `queue_ms`,
        `inference_ms` (the forward pass of its batch of `batch_size` images) and `time_ms`,
        their total (the upload is not in it)."""
        if state["in_flight"] >= config.max_in_flight:
            raise HTTPException(
                503,
                f"busy: {config.max_in_flight} requests in flight, retry shortly",
                headers={"Retry-After": "1"},
            )
        state["in_flight"] += 1
        arrived = time.perf_counter()
        try:
            return await answer(request, arrived, config.min_score if min_score is None else min_score)
        except _ClientGone:
            log.info("client %s went away before its image was sent", _peer(request))
            return Response(status_code=499)  # nobody reads it; /metrics counts it (nginx's code)
        finally:
            state["in_flight"] -= 1

    async def answer(request: Request, arrived: float, min_score: float) -> dict[str, Any]:
        body = await read_body(request, min(config.body_timeout_s, config.request_timeout_s))
        boundary = None
        try:
            boundary = boundary_of(request.headers.get("content-type", ""))
            if boundary is not None:
                body = multipart_file(body, boundary)
        except MultipartError as exc:
            raise HTTPException(400, f"{exc}; {HINT}") from None
        if not body:
            raise HTTPException(400, f"empty body: {HINT}")
        start = time.perf_counter()
        if "decode" not in limiter:
            limiter["decode"] = anyio.CapacityLimiter(config.decode_threads)
        try:
            image, (width, height) = await anyio.to_thread.run_sync(decode, body, limiter=limiter["decode"])
        except ImageTooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        except UnsupportedImage as exc:
            raise HTTPException(415, f"{exc}; {HINT}") from None
        except ImageReadError as exc:  # truncated or damaged: a supported format, bad data
            raise HTTPException(400, str(exc)) from None
        decoded = time.perf_counter()
        future = worker.submit(image)
        remaining = config.request_timeout_s - (decoded - arrived)
        try:
            result, timing = await asyncio.wait_for(asyncio.wrap_future(future), max(remaining, 0.001))
        except asyncio.TimeoutError:
            future.cancel()
            raise HTTPException(
                503,
                f"no answer within the request timeout of {config.request_timeout_s:g} s: the model is busy",
                headers={"Retry-After": "5"},
            ) from None
        assert isinstance(timing, Timing)
        result = _to_frame(result, image, width, height)
        done = time.perf_counter()
        metrics.detection(done - start, timing.queue_ms / 1000)
        return {
            "width": width,
            "height": height,
            "time_ms": round((done - start) * 1000, 2),
            "decode_ms": round((decoded - start) * 1000, 2),
            "queue_ms": round(timing.queue_ms, 2),
            "inference_ms": round(timing.inference_ms, 2),
            "batch_size": timing.batch_size,
            "detections": detection_records(result, min_score),
        }

    _add_docs(app)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    return app


def _too_large(message: str) -> HTTPException:
    return HTTPException(413, message, headers={"Connection": "close"})


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def _to_frame(result: dict[str, Any], image: Tensor, width: int, height: int) -> dict[str, Any]:
    """Boxes found in a reduced decode, in the pixels of the image at its own `width` x `height`."""
    if (image.shape[-1], image.shape[-2]) == (width, height):
        return result
    sx, sy = width / image.shape[-1], height / image.shape[-2]
    scale = torch.tensor([sx, sy, sx, sy], dtype=result["boxes"].dtype)
    boxes = result["boxes"] * scale
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return {**result, "boxes": torch.minimum(boxes, limits)}


_BINARY = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
# What /docs offers: a file picker (the multipart form), and the raw body for other clients.
_REQUEST_BODY = {
    "required": True,
    "description": "The image: a multipart form with the field 'file', or the file's bytes as the body.",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {**_BINARY, "description": "JPEG, PNG, BMP, TIFF, WebP, PPM/PGM"}},
            }
        },
        "application/octet-stream": {"schema": _BINARY},
        "image/jpeg": {"schema": _BINARY},
        "image/png": {"schema": _BINARY},
    },
}


def _swagger_assets() -> Optional[str]:
    """The folder of Swagger UI's script and style sheet from the fastapi-offline package, if installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = os.path.join(os.path.dirname(fastapi_offline.__file__), "static")
    return folder if os.path.isfile(os.path.join(folder, "swagger-ui-bundle.js")) else None


def _add_docs(app: FastAPI) -> None:
    """`/docs`, Swagger UI from local files (the fastapi-offline package's copy), never from a CDN."""
    from fastapi.openapi.docs import get_swagger_ui_html

    assets = _swagger_assets()
    if assets is None:

        @app.get("/docs", include_in_schema=False)
        def docs_missing() -> HTMLResponse:
            return HTMLResponse(
                "<!doctype html><title>m2det API</title><p>Swagger UI's files are not installed here: "
                "<code>pip install 'm2det[serve]'</code> (fastapi-offline) shows the interactive page. "
                'The API description is at <a href="/openapi.json">/openapi.json</a>; docs/serve.md '
                "describes it.</p>",
                status_code=200,
            )

        return
    from fastapi.staticfiles import StaticFiles

    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="m2det API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )
