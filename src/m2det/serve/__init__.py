"""An HTTP service around a `Detector` (FastAPI): post an image, get its detections as JSON."""

from m2det.serve.app import create_app

__all__ = ["create_app"]
