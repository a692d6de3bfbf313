"""The FastAPI application: one loaded `Detector` answering `POST /detect` with JSON detections.

The image travels as the raw request body (a JPEG, PNG, BMP, TIFF, WebP, ... file's bytes), so
clients need no multipart encoding: `curl --data-binary @street.jpg localhost:8000/detect`. It is
decoded by the rule every part of m2det reads images by (`m2det.io.image`: EXIF orientation
applied, so `width`/`height` and the boxes are those of the upright image).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from torch import Tensor

from m2det.inference.detector import Detector
from m2det.inference.results import detection_records
from m2det.io.image import ImageReadError, UnsupportedImage, decode_image
from m2det.serve.page import mount_page

MAX_IMAGE_BYTES = 32 * 1024 * 1024


def create_app(detector: Detector, max_image_bytes: int = MAX_IMAGE_BYTES) -> FastAPI:
    """Build the app for one detector; requests are served one network call at a time."""
    app = FastAPI(title="m2det", description="M2Det object detection")
    lock = threading.Lock()  # one model, one forward pass at a time
    mount_page(app)  # the web page at /: pick an image, see its detections drawn

    def run_detector(image: Tensor) -> dict[str, Any]:
        with lock:
            result = detector(image)
        assert isinstance(result, dict)  # one CHW image in, one result out
        return result

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def model_info() -> dict[str, Any]:
        config = detector.model.config
        return {
            "name": config.name,
            "input_size": detector.model.input_size,
            "num_classes": config.num_classes,
            "class_names": detector.class_names,
            "device": str(detector.device),
            "score_threshold": detector.settings.score_threshold,
            "min_score": detector.settings.min_score,
        }

    @app.post("/detect")
    async def detect(
        request: Request, min_score: Optional[float] = Query(None, ge=0.0, le=1.0)
    ) -> dict[str, Any]:
        body = await request.body()
        if not body:
            raise HTTPException(400, "empty body: send the image file's bytes as the request body")
        if len(body) > max_image_bytes:
            raise HTTPException(413, f"image of {len(body)} bytes exceeds the limit of {max_image_bytes}")
        # decoding and the network run in a worker thread, so /health and new requests are still
        # answered while a forward pass runs; the lock keeps the forward passes one at a time
        try:
            image = await run_in_threadpool(decode_image, body, "request body")
        except UnsupportedImage as exc:
            raise HTTPException(415, str(exc)) from None
        except ImageReadError as exc:  # truncated or damaged: a supported format, bad data
            raise HTTPException(400, str(exc)) from None
        start = time.perf_counter()
        result = await run_in_threadpool(run_detector, image)
        elapsed = (time.perf_counter() - start) * 1000
        return {
            "width": int(image.shape[-1]),
            "height": int(image.shape[-2]),
            "time_ms": round(elapsed, 2),
            "detections": detection_records(result, min_score or 0.0),
        }

    return app
