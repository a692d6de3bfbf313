"""INT8 for OpenVINO: NNCF post-training quantisation of an M2Det IR, calibrated on the user's images.

NNCF inserts FakeQuantize nodes (int8 weights per output channel, activations per tensor with
ranges from the calibration images, its CPU preset) that OpenVINO's CPU plugin turns into
integer kernels. The calibration images are the ONNX INT8 path's (`m2det.deploy.calibration`):
the same sample of the data set, prepared as evaluation prepares it.

As in the ONNX path, the graph's tail stays in float (an NNCF ignored scope): the reshapes that
gather the heads' outputs, box decoding and softmax. It is cheap, quantising box offsets or
probabilities would cost accuracy for nothing, and an untrained network's offsets can overflow
the decoding's `exp`, which no calibrated range can hold. `float_heads` also keeps the loc/conf
head convolutions in float, which protects the small score differences that ranking depends on.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from m2det.deploy.calibration import CalibrationImages, QuantizationReport
from m2det.deploy.openvino_backend import EXTRA_HINT, model_metadata, set_metadata
from m2det.errors import M2DetError

# OpenVINO op types that only move data in or out of the graph: never in an ignored scope.
_STRUCTURAL_OPS = ("Parameter", "Result", "Constant")
_CONV_OPS = ("Convolution", "GroupConvolution")


def import_nncf() -> Any:
    """The `nncf` module, or a clear error naming the extra that installs it."""
    try:
        import nncf
    except ImportError:
        raise M2DetError(f"OpenVINO INT8 quantisation needs the nncf package: {EXTRA_HINT}") from None
    return nncf


def tail_ops(model: Any, head_convs: bool = False) -> list[str]:
    """Friendly names of the ops from which no convolution can be reached (the gathering reshapes,
    decoding, softmax); with `head_convs`, the convolutions among them too (the loc/conf heads)."""
    ops = list(model.get_ordered_ops())  # topological order
    reaches_conv: dict[str, bool] = {}
    for op in reversed(ops):
        consumers = [target.get_node() for output in op.outputs() for target in output.get_target_inputs()]
        reaches_conv[op.get_friendly_name()] = any(
            child.get_type_name() in _CONV_OPS or reaches_conv.get(child.get_friendly_name(), False)
            for child in consumers
        )
    return [
        op.get_friendly_name()
        for op in ops
        if not reaches_conv[op.get_friendly_name()]
        and op.get_type_name() not in _STRUCTURAL_OPS
        and (head_convs or op.get_type_name() not in _CONV_OPS)
    ]


def _int8_weights(node: Any) -> bool:
    """Whether a convolution's weights input is NNCF's int8 form: an int8 constant dequantised by
    Convert -> (Subtract) -> Multiply, or a FakeQuantize of the float weights."""
    while node.get_type_name() in ("Multiply", "Subtract", "Convert"):
        node = node.input_value(0).get_node()
    if node.get_type_name() == "FakeQuantize":
        return True
    return node.get_type_name() == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8")


def count_quantized_ops(model: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Op types that run on int8 (convolutions with int8 weights; other ops fed by a FakeQuantize)
    and the compute op types that do not. Not counted: FakeQuantize itself, the weights'
    dequantisation chain and ops on constants alone (folded when the model is compiled)."""
    quantized: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in (*_STRUCTURAL_OPS, "FakeQuantize", "Convert", "ShapeOf"):
            continue
        sources = [value.get_node() for value in op.input_values()]
        if all(source.get_type_name() in ("Constant", "Convert") for source in sources):
            continue
        if kind in _CONV_OPS:
            int8 = _int8_weights(sources[1])
        else:
            int8 = any(source.get_type_name() == "FakeQuantize" for source in sources)
        (quantized if int8 else floating)[kind] += 1
    return dict(quantized), dict(floating)


class _Batches:
    """The calibration images, iterable as often as NNCF needs (statistics, then bias correction)."""

    def __init__(self, images: CalibrationImages):
        self.images = images

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.images.batches()

    def __len__(self) -> int:
        return len(self.images)


def quantize_openvino(
    model: Any, images: CalibrationImages, *, source: str = "", float_heads: bool = False
) -> tuple[Any, QuantizationReport]:
    """`model` (an `openvino.Model` from `convert_to_openvino`) quantised to INT8 with NNCF on
    `images`; returns the quantised model, with the m2det metadata and a `m2det.quantization`
    entry, and what was done (`path` None: nothing is written here)."""
    nncf = import_nncf()
    start = time.perf_counter()
    metadata = model_metadata(model)
    ignored = tail_ops(model, head_convs=float_heads)
    settings = {
        "tool": f"nncf {nncf.__version__}",
        "preset": "performance (symmetric int8 weights per channel, activations per tensor)",
        "target_device": "CPU",
        "heads": "float" if float_heads else "int8",
        "float_ops": "the tail after the last convolutions (gathering, decoding, softmax)",
    }
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # not a line per op it leaves alone
    try:
        quantized_model = nncf.quantize(
            model,
            nncf.Dataset(_Batches(images)),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            target_device=nncf.TargetDevice.CPU,
            subset_size=len(images),
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        )
    finally:
        nncf_logger.setLevel(level)
    set_metadata(
        quantized_model,
        {
            **metadata,
            "m2det.quantization": json.dumps(
                {**settings, "calibration_images": len(images), "calibration_source": source}
            ),
        },
    )
    quantized, floating = count_quantized_ops(quantized_model)
    return quantized_model, QuantizationReport(
        path=None,
        quantized_ops=quantized,
        float_ops=floating,
        calibration_images=len(images),
        calibration_source=source,
        seconds=time.perf_counter() - start,
        settings=settings,
    )
