"""Deployment: the fast inference path, ONNX/TorchScript export, ONNX Runtime and INT8 on the CPU.

Export, ONNX Runtime and quantisation live in submodules so that importing this package needs
neither onnx nor onnxruntime.
"""

from m2det.deploy.fuse import AffineInputConv2d, fold_batchnorms
from m2det.deploy.optimize import InferenceM2Det, InferenceOptions, optimize_for_inference

__all__ = [
    "AffineInputConv2d",
    "InferenceM2Det",
    "InferenceOptions",
    "fold_batchnorms",
    "optimize_for_inference",
]
