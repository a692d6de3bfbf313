"""INT8 for the CPU: static post-training quantisation of an exported ONNX model with ONNX Runtime.

Weights are quantised per output channel (int8, symmetric), activations per tensor (uint8) from
ranges calibrated on images of the user's data, prepared exactly as evaluation prepares them (the
eval transform, then the model's normalisation). The QDQ format keeps the graph a standard ONNX
graph; ONNX Runtime fuses each DequantizeLinear -> op -> QuantizeLinear into an integer kernel.

The graph's tail (box decoding, softmax and the reshapes that gather the heads' outputs) stays in
float: it is cheap, and quantising box offsets or probabilities would cost accuracy for nothing.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from m2det.deploy.calibration import CalibrationImages, QuantizationReport, dataset_calibration_images
from m2det.deploy.formats import INPUT_NAME
from m2det.errors import ConfigError
from m2det.io.atomic import atomic_path

# Ops quantised (when their neighbours allow): the convolutions carry the work, the rest lets
# int8 tensors flow between convolutions without a round trip through float.
QUANTIZED_OP_TYPES = ("Conv", "MaxPool", "Concat", "Resize", "Add", "Mul", "Relu")
# How activation ranges are set from the calibration images (ONNX Runtime's CalibrationMethod).
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class DatasetCalibrationReader(CalibrationImages, CalibrationDataReader):
    """ONNX Runtime's `CalibrationDataReader` over `CalibrationImages`: one image per batch, fed as
    the graph's input `images`."""

    def __init__(self, dataset: Any, normalize: Any, num_images: int, seed: int = 0):
        super().__init__(dataset, normalize, num_images, seed)
        self._iterator: Optional[Iterator[dict[str, np.ndarray]]] = None

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self._iterator is None:
            self._iterator = ({INPUT_NAME: batch} for batch in self.batches())
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = None


def calibration_reader(
    fp32_path: Union[str, Path], source: Union[str, Path], split: str, num_images: int, seed: int = 0
) -> DatasetCalibrationReader:
    """Calibration images from `m2det.data.build_dataset(source, split)` with the eval transform,
    normalised as the ONNX model at `fp32_path` expects."""
    from m2det.deploy.onnx_backend import OnnxRuntimeNetwork

    network = OnnxRuntimeNetwork(fp32_path)
    images = dataset_calibration_images(network.config, network.input_size, source, split, num_images, seed)
    return DatasetCalibrationReader(images.dataset, images.normalize, num_images, seed)


def _tail_nodes(graph: Any, last_convs: bool = False) -> list[str]:
    """Names of the nodes from which no Conv can be reached (the reshapes and concats that gather
    the heads' outputs); with `last_convs`, the convs among them too (the loc/conf heads)."""
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    nodes = list(graph.node)
    reaches_conv = [False] * len(nodes)
    for index in reversed(range(len(nodes))):  # ONNX stores nodes in topological order
        reaches_conv[index] = any(
            nodes[child].op_type == "Conv" or reaches_conv[child]
            for out in nodes[index].output
            for child in consumers.get(out, [])
        )
    return [
        node.name
        for node, reaches in zip(nodes, reaches_conv)
        if not reaches and (last_convs or node.op_type != "Conv")
    ]


def split_network(proto: Any) -> tuple[Any, list[Any], list[Any]]:
    """The exported graph cut at its raw outputs `loc` and `logits`: a model of the network alone,
    and the nodes and initializers of the tail that decodes them (quantised and calibrated apart:
    an untrained network's offsets can overflow `exp` there, which calibration cannot range)."""
    import onnx

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    needed: set[int] = set()
    pending = ["loc", "logits"]
    while pending:
        node = producer.get(pending.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            pending.extend(node.input)
    network = onnx.ModelProto()
    network.CopyFrom(proto)
    del network.graph.node[:]
    network.graph.node.extend(n for n in graph.node if id(n) in needed)
    del network.graph.output[:]
    network.graph.output.extend(o for o in graph.output if o.name in ("loc", "logits"))
    tail = [n for n in graph.node if id(n) not in needed]
    tail_inputs = {name for node in tail for name in node.input}
    network_inputs = {name for node in network.graph.node for name in node.input}
    del network.graph.initializer[:]
    network.graph.initializer.extend(t for t in graph.initializer if t.name in network_inputs)
    return network, tail, [t for t in graph.initializer if t.name in tail_inputs]


def count_quantized_ops(proto: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Op types that run as integer kernels (fed by DequantizeLinear, every output going to
    QuantizeLinear: ORT fuses them) and the op types left in float; Q/DQ nodes are not counted."""
    produced_by = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    quantized: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        fed = any(
            name in produced_by and produced_by[name].op_type == "DequantizeLinear" for name in node.input
        )
        feeds = all(
            consumers.get(out) and all(c.op_type == "QuantizeLinear" for c in consumers[out])
            for out in node.output
        )
        (quantized if fed and feeds else floating)[node.op_type] += 1
    return dict(quantized), dict(floating)


def quantize_onnx(
    fp32_path: Union[str, Path],
    int8_path: Union[str, Path],
    reader: DatasetCalibrationReader,
    *,
    source: str = "",
    per_channel: bool = True,
    op_types: tuple[str, ...] = QUANTIZED_OP_TYPES,
    calibration: str = "minmax",
    float_heads: bool = False,
) -> QuantizationReport:
    """Quantise the FP32 model at `fp32_path` (written by `export_onnx`) to `int8_path` (QDQ, static).

    `calibration` picks how activation ranges are set (one of CALIBRATION_METHODS); `float_heads`
    keeps the loc/conf head convolutions in float, which costs little time and protects the
    small score differences that ranking depends on.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    if calibration not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration must be one of {CALIBRATION_METHODS}, got {calibration!r}")
    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[calibration]
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    start = time.perf_counter()
    original = onnx.load(str(fp32_path))
    metadata = {p.key: p.value for p in original.metadata_props}
    settings = {
        "format": "QDQ",
        "weights": "int8, symmetric, " + ("per channel" if per_channel else "per tensor"),
        "activations": f"uint8, per tensor, {calibration} calibration",
        "heads": "float" if float_heads else "int8",
        "op_types": list(op_types),
    }

    network, tail_nodes, tail_initializers = split_network(original)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        onnx.save(network, str(Path(tmp) / "network.onnx"))
        quant_pre_process(str(Path(tmp) / "network.onnx"), str(prepared), skip_symbolic_shape=False)
        excluded = _tail_nodes(onnx.load(str(prepared)).graph, last_convs=float_heads)
        reader.rewind()
        output = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(output),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=calibrate_method,
            extra_options={"WeightSymmetric": True},
        )
        proto = onnx.load(str(output))
    # the float tail back on: decoding, softmax (and NMS) read the int8 network's loc and logits
    proto.graph.node.extend(tail_nodes)
    present = {t.name for t in proto.graph.initializer}
    proto.graph.initializer.extend(t for t in tail_initializers if t.name not in present)
    del proto.graph.output[:]
    proto.graph.output.extend(original.graph.output)
    onnx.checker.check_model(proto)
    quantized, floating = count_quantized_ops(proto)
    del proto.metadata_props[:]
    metadata["m2det.quantization"] = json.dumps(
        {**settings, "calibration_images": len(reader), "calibration_source": source}
    )
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(int8_path) as tmp_path:
        onnx.save(proto, str(tmp_path))
    return QuantizationReport(
        path=int8_path,
        quantized_ops=quantized,
        float_ops=floating,
        calibration_images=len(reader),
        calibration_source=source,
        seconds=time.perf_counter() - start,
        settings=settings,
    )
