"""The FastAPI application: one loaded `Detector` answering `POST /detect` with JSON detections.

The image travels as the raw request body (any format OpenCV decodes), so clients need no
multipart encoding: `curl --data-binary @street.jpg localhost:8000/detect`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import cv2
import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from m2det.inference.detector import Detector
from m2det.inference.results import detection_records

MAX_IMAGE_BYTES = 32 * 1024 * 1024


def create_app(detector: Detector, max_image_bytes: int = MAX_IMAGE_BYTES) -> FastAPI:
    """Build the app for one detector; requests are served one network call at a time."""
    app = FastAPI(title="m2det", description="M2Det object detection")
    lock = threading.Lock()  # one model, one forward pass at a time

    def run_detector(image: np.ndarray) -> dict[str, Any]:
        with lock:
            return detector(image)

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
        image = await run_in_threadpool(cv2.imdecode, np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise HTTPException(
                415, "the body is not an image OpenCV can decode (JPEG, PNG, BMP, TIFF, WebP, ...)"
            )
        start = time.perf_counter()
        result = await run_in_threadpool(run_detector, image)
        elapsed = (time.perf_counter() - start) * 1000
        return {
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "time_ms": round(elapsed, 2),
            "detections": detection_records(result, min_score or 0.0),
        }

    return app
