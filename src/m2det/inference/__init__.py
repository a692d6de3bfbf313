"""Inference on real inputs: the network seam (`Network`, one per runtime), the pipeline around
it (`DetectionPipeline`), the `Detector` API, detection runs over files, reading images and videos."""

from m2det.inference.network import Network, load_network
from m2det.inference.pipeline import DetectionPipeline

__all__ = ["DetectionPipeline", "Network", "load_network"]
