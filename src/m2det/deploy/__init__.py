"""Deployment: the runtimes behind the `m2det.inference.Network` seam (the fast PyTorch path,
ONNX Runtime for FP32 and INT8 graphs), ONNX/TorchScript export and INT8 quantisation.

Export, ONNX Runtime and quantisation live in submodules so that importing this package needs
neither onnx nor onnxruntime.
"""

from m2det.deploy.fuse import AffineInputConv2d, fold_batchnorms
from m2det.deploy.optimize import InferenceOptions, OptimizedNetwork, optimize_for_inference

__all__ = [
    "AffineInputConv2d",
    "InferenceOptions",
    "OptimizedNetwork",
    "fold_batchnorms",
    "optimize_for_inference",
]
