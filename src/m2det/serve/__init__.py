"""An HTTP service around a `Detector` (FastAPI): post an image, get its detections as JSON."""

from m2det.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
