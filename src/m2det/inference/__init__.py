"""Inference on real inputs: the `Detector` API, multi-scale testing, reading images and videos."""
