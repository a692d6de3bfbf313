"""Export an M2Det as one self-describing file: ONNX (for ONNX Runtime and others), TorchScript, or
an OpenVINO IR (.xml + .bin, FP32 or INT8).

The exported graph takes the normalised batch `images` float32 [N, 3, S, S] (N dynamic, S fixed:
the anchors are laid out for it) and returns

* `boxes`  [N, A, 4]: decoded boxes, xyxy normalised to [0, 1] (not clipped),
* `scores` [N, A, C]: softmax class probabilities, background at 0,
* `loc` [N, A, 4] and `logits` [N, A, C]: the raw network outputs, for runtimes that decode
  themselves (m2det's `Detector`, multi-scale testing);

and with in-graph NMS also `det_boxes` [K, 4], `det_scores` [K], `det_labels` [K] (1..C-1) and
`det_batch_index` [K], sorted by image, then class, then decreasing score.

ONNX goes through `torch.onnx.export(dynamo=True)`, the exporter torch maintains (the TorchScript
one is deprecated); the graph has no data-dependent control flow, so torch.export captures it
whole, and the NMS is appended as ONNX's own `NonMaxSuppression` op rather than traced. The
configuration, class names and input convention are written into the file's metadata.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torchvision.ops import nms

from m2det.deploy.calibration import CalibrationImages, QuantizationReport
from m2det.deploy.formats import FORMAT, INPUT_NAME, NMS_OUTPUT_NAMES, OUTPUT_NAMES
from m2det.deploy.fuse import fold_batchnorms
from m2det.deploy.onnx_backend import OnnxRuntimeNetwork
from m2det.errors import ConfigError, FileFormatError
from m2det.io.atomic import atomic_path
from m2det.models.m2det import M2Det

ONNX_OPSET = 18


@dataclass(frozen=True)
class GraphNMS:
    """Hard NMS in the exported graph: per image and class, scores > `score_threshold`, suppress
    IoU > `iou_threshold`, at most `max_per_class` boxes (ONNX `NonMaxSuppression` semantics)."""

    score_threshold: float = 0.05
    iou_threshold: float = 0.45
    max_per_class: int = 50

    def __post_init__(self) -> None:
        for name in ("score_threshold", "iou_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"nms {name} must be in [0, 1], got {value}")
        if self.max_per_class < 1:
            raise ConfigError(f"nms max_per_class must be >= 1, got {self.max_per_class}")


def input_convention(model: M2Det, input_size: int) -> str:
    means = ", ".join(f"{m:g}" for m in model.config.pixel_means)
    return (
        f"{INPUT_NAME}: float32 [N, 3, {input_size}, {input_size}], channels in BGR order, pixel values "
        f"0..255 minus the per-channel means ({means}) in BGR order, no std scaling; each image resized "
        f"(bilinear, not letterboxed) to {input_size}x{input_size}. m2det's M2Det.preprocess builds it "
        f"from RGB images."
    )


def export_metadata(model: M2Det, input_size: int, nms: Optional[GraphNMS]) -> dict[str, str]:
    """What a runtime needs beside the graph: the config, class names, input convention, outputs."""
    outputs = {
        "boxes": "[N, A, 4] decoded boxes, xyxy normalised to [0, 1], not clipped",
        "scores": "[N, A, C] softmax class probabilities, background at index 0",
        "loc": "[N, A, 4] raw box offsets (SSD coding, variances in the config)",
        "logits": "[N, A, C] raw class logits",
    }
    if nms is not None:
        outputs.update(
            det_boxes="[K, 4] kept boxes, xyxy normalised",
            det_scores="[K] their scores",
            det_labels="[K] int64 labels, 1..C-1 (class_names[label - 1])",
            det_batch_index="[K] int64 image of each box in the batch",
        )
    return {
        "m2det.format": FORMAT,
        "m2det.config": model.config.to_json(),
        "m2det.class_names": json.dumps(model.config.categories[1:]),
        "m2det.input": input_convention(model, input_size),
        "m2det.input_size": str(input_size),
        "m2det.num_anchors": str(int(model.anchors(input_size).shape[0])),
        "m2det.outputs": json.dumps(outputs),
        "m2det.nms": json.dumps(asdict(nms) if nms is not None else None),
    }


class DetectionGraph(nn.Module):
    """What is exported: the normalised batch -> decoded boxes, softmax scores and raw outputs.

    Built from a copy of `model` with its BatchNorms folded (`model` is untouched).
    """

    anchors: Tensor  # a buffer: the input size's anchors [A, 4]

    def __init__(self, model: M2Det, input_size: Optional[int] = None, fold_batchnorm: bool = True):
        super().__init__()
        if not isinstance(model, M2Det):  # another runtime (optimised, ONNX Runtime) has no graph to trace
            raise ValueError(
                f"export the original PyTorch M2Det, not a {type(model).__name__} (export folds BatchNorms itself)"
            )
        self.input_size = int(input_size or model.config.input_size)
        self.network = copy.deepcopy(model).float().eval()
        self.network.to(memory_format=torch.contiguous_format)
        if fold_batchnorm:
            fold_batchnorms(self.network)
        self.network.requires_grad_(False)
        self.box_coder = model.box_coder
        self.register_buffer("anchors", model.anchors(self.input_size).to(model.pixel_means.device))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        loc, logits = self.network.forward_raw(images)
        return self.box_coder.decode(loc, self.anchors), logits.softmax(dim=-1), loc, logits


class ClassNMS(nn.Module):
    """TorchScript counterpart of ONNX `NonMaxSuppression`: per image and foreground class."""

    def __init__(self, settings: GraphNMS):
        super().__init__()
        self.score_threshold = float(settings.score_threshold)
        self.iou_threshold = float(settings.iou_threshold)
        self.max_per_class = int(settings.max_per_class)

    def forward(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        kept_boxes, kept_scores, kept_labels, kept_images = [], [], [], []
        for image in range(boxes.shape[0]):
            for label in range(1, scores.shape[2]):
                class_scores = scores[image, :, label]
                candidates = torch.nonzero(class_scores > self.score_threshold).squeeze(1)
                keep = nms(boxes[image, candidates], class_scores[candidates], self.iou_threshold)
                keep = candidates[keep[: self.max_per_class]]
                kept_boxes.append(boxes[image, keep])
                kept_scores.append(class_scores[keep])
                kept_labels.append(torch.full_like(keep, label))
                kept_images.append(torch.full_like(keep, image))
        if len(kept_boxes) == 0:  # an empty batch
            empty = torch.zeros(0, dtype=torch.int64, device=boxes.device)
            return boxes.new_zeros((0, 4)), scores.new_zeros(0), empty, empty
        return torch.cat(kept_boxes), torch.cat(kept_scores), torch.cat(kept_labels), torch.cat(kept_images)


class _TracedWithNMS(nn.Module):
    def __init__(self, graph: torch.jit.ScriptModule, nms: ClassNMS):
        super().__init__()
        self.graph = graph
        self.nms = nms

    def forward(
        self, images: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        boxes, scores, loc, logits = self.graph(images)
        det_boxes, det_scores, det_labels, det_images = self.nms(boxes, scores)
        return boxes, scores, loc, logits, det_boxes, det_scores, det_labels, det_images


@dataclass
class ExportReport:
    """The written file, its output names and the largest difference from PyTorch per output
    (relative to that output's largest magnitude) on a check batch."""

    path: Path
    format: str
    outputs: tuple[str, ...]
    max_abs_error: dict[str, float] = field(default_factory=dict)
    relative_error: dict[str, float] = field(default_factory=dict)
    check_batch: int = 0


def _check_input(model: M2Det, input_size: int, batch: int, seed: int = 0) -> Tensor:
    """A batch in the model's convention from random RGB images (realistic range for the check)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, input_size, input_size, generator=generator)
    return model.normalize(images.to(model.pixel_means.device))


def _compare(
    report: ExportReport, graph: DetectionGraph, x: Tensor, outputs: list[Tensor], tolerance: float
) -> None:
    """The file's raw outputs against PyTorch's, and its decoded outputs against PyTorch's decoding
    of the file's own raw outputs (softmax and exp would magnify the network's rounding noise)."""
    got = dict(zip(OUTPUT_NAMES, (v.detach().float().cpu() for v in outputs)))
    with torch.no_grad():
        loc, logits = graph.network.forward_raw(x)
    expected = {
        "boxes": graph.box_coder.decode(got["loc"], graph.anchors.cpu()),
        "scores": got["logits"].softmax(dim=-1),
        "loc": loc.float().cpu(),
        "logits": logits.float().cpu(),
    }
    for name in OUTPUT_NAMES:
        a, b = got[name], expected[name]
        if a.shape != b.shape:
            raise RuntimeError(
                f"exported output {name!r} has shape {tuple(a.shape)}, PyTorch {tuple(b.shape)}"
            )
        # Untrained weights can overflow the box decoding's exp; such entries must overflow alike.
        finite = torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), finite) or not torch.allclose(
            a[~finite], b[~finite], equal_nan=True
        ):
            raise RuntimeError(
                f"exported output {name!r} has infinite or NaN values where PyTorch has none (or the reverse)"
            )
        a, b = a[finite], b[finite]
        error = float((a - b).abs().max()) if a.numel() else 0.0
        scale = float(b.abs().max()) if b.numel() else 0.0
        report.max_abs_error[name] = error
        report.relative_error[name] = error / max(scale, 1.0)
        if report.relative_error[name] > tolerance:
            raise RuntimeError(
                f"exported output {name!r} differs from PyTorch by {error:.3g} (largest value {scale:.3g}); "
                f"the export is not faithful"
            )


def export_onnx(
    model: M2Det,
    path: Union[str, Path],
    *,
    input_size: Optional[int] = None,
    nms: Optional[GraphNMS] = None,
    fold_batchnorm: bool = True,
    opset: int = ONNX_OPSET,
    check: bool = True,
    check_batch: int = 2,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Write `model` as an ONNX file with a dynamic batch (see the module docstring for the graph).

    With `check`, the file is run with ONNX Runtime on `check_batch` images and compared to
    PyTorch; a difference above `tolerance` (relative to each output's largest value) raises.
    """
    import onnx

    graph = DetectionGraph(model, input_size, fold_batchnorm).cpu()
    size = graph.input_size
    example = _check_input(graph.network, size, 2)
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "graph.onnx"
        _dynamo_export(graph, example, raw, opset)
        proto = onnx.load(str(raw))
    if nms is not None:
        append_onnx_nms(proto, nms)
    for key, value in export_metadata(model, size, nms).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = input_convention(model, size)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp_path:
        onnx.save(proto, str(tmp_path))
    names = OUTPUT_NAMES + (NMS_OUTPUT_NAMES if nms is not None else ())
    report = ExportReport(path=path, format="onnx", outputs=names)
    if check:
        x = _check_input(graph.network, size, check_batch, seed=1).cpu()
        outputs = OnnxRuntimeNetwork(path).outputs(x, list(OUTPUT_NAMES))
        _compare(report, graph, x, [outputs[name] for name in OUTPUT_NAMES], tolerance)
        report.check_batch = check_batch
    return report


def _dynamo_export(graph: DetectionGraph, example: Tensor, path: Path, opset: int) -> None:
    # the exporter's progress lines and warnings are not the user's concern; errors still raise
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def append_onnx_nms(proto: Any, settings: GraphNMS) -> None:
    """Append ONNX `NonMaxSuppression` over the graph's `boxes`/`scores` and gather the kept rows."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    names = {o.name for o in graph.output}
    if not {"boxes", "scores"} <= names:
        raise ValueError(f"the graph has no 'boxes'/'scores' outputs to suppress (outputs: {sorted(names)})")

    def constant(name: str, value: Any, dtype: Any) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    big = np.iinfo(np.int64).max
    nodes = [
        helper.make_node(
            "Slice",
            [
                "scores",
                constant("nms_from", [1], np.int64),
                constant("nms_to", [big], np.int64),
                constant("nms_axis", [2], np.int64),
            ],
            ["nms_fg_scores"],
        ),
        helper.make_node("Transpose", ["nms_fg_scores"], ["nms_class_scores"], perm=[0, 2, 1]),
        helper.make_node(
            "NonMaxSuppression",
            [
                "boxes",
                "nms_class_scores",
                constant("nms_max_per_class", [settings.max_per_class], np.int64),
                constant("nms_iou", [settings.iou_threshold], np.float32),
                constant("nms_score", [settings.score_threshold], np.float32),
            ],
            ["nms_selected"],
            center_point_box=0,
        ),
        helper.make_node(
            "Gather",
            ["nms_selected", constant("nms_image_box", [0, 2], np.int64)],
            ["nms_image_box_idx"],
            axis=1,
        ),
        helper.make_node("GatherND", ["boxes", "nms_image_box_idx"], ["det_boxes"]),
        helper.make_node("GatherND", ["nms_class_scores", "nms_selected"], ["det_scores"]),
        helper.make_node(
            "Gather", ["nms_selected", constant("nms_col0", 0, np.int64)], ["det_batch_index"], axis=1
        ),
        helper.make_node(
            "Gather", ["nms_selected", constant("nms_col1", 1, np.int64)], ["nms_class_idx"], axis=1
        ),
        helper.make_node("Add", ["nms_class_idx", constant("nms_one", 1, np.int64)], ["det_labels"]),
    ]
    graph.node.extend(nodes)
    graph.output.extend(
        [
            helper.make_tensor_value_info("det_boxes", TensorProto.FLOAT, ["num_detections", 4]),
            helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, ["num_detections"]),
            helper.make_tensor_value_info("det_labels", TensorProto.INT64, ["num_detections"]),
            helper.make_tensor_value_info("det_batch_index", TensorProto.INT64, ["num_detections"]),
        ]
    )


def export_torchscript(
    model: M2Det,
    path: Union[str, Path],
    *,
    input_size: Optional[int] = None,
    nms: Optional[GraphNMS] = None,
    fold_batchnorm: bool = True,
    check: bool = True,
    check_batch: int = 3,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Write `model` as a TorchScript file (traced network, scripted NMS) with the metadata of
    `export_metadata` in its extra file `m2det.json`; checked against PyTorch like `export_onnx`."""
    graph = DetectionGraph(model, input_size, fold_batchnorm)
    size = graph.input_size
    example = _check_input(graph.network, size, 2)
    path = Path(path)
    extra = {"m2det.json": json.dumps(export_metadata(model, size, nms))}
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export (hence ONNX as the main format), and
        # the tracer warns about every shape it reads; neither is actionable here
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # traced at batch 2, checked at another batch size below: the batch dimension stays symbolic
        module: torch.jit.ScriptModule = torch.jit.trace(graph, (example,), check_trace=False)
        if nms is not None:
            module = torch.jit.script(_TracedWithNMS(module, ClassNMS(nms)))
        with atomic_path(path) as tmp_path:
            torch.jit.save(module, str(tmp_path), _extra_files=extra)
        loaded = torch.jit.load(str(path), map_location=example.device) if check else None
    names = OUTPUT_NAMES + (NMS_OUTPUT_NAMES if nms is not None else ())
    report = ExportReport(path=path, format="torchscript", outputs=names)
    if loaded is not None:
        x = _check_input(graph.network, size, check_batch, seed=1)
        with torch.no_grad():
            got = list(loaded(x))[: len(OUTPUT_NAMES)]
        _compare(report, graph, x, got, tolerance)
        report.check_batch = check_batch
    return report


def openvino_model(model: M2Det, input_size: Optional[int] = None, fold_batchnorm: bool = True) -> Any:
    """`model` converted in memory to an `openvino.Model` (FP32): the graph `export_onnx` writes
    (without NMS), with its metadata in the IR's rt_info (`m2det.deploy.openvino_backend`)."""
    return _convert_graph(model, DetectionGraph(model, input_size, fold_batchnorm).cpu())


def _convert_graph(model: M2Det, graph: DetectionGraph) -> Any:
    from m2det.deploy.openvino_backend import convert_to_openvino

    example = _check_input(graph.network, graph.input_size, 2)
    return convert_to_openvino(graph, example, export_metadata(model, graph.input_size, None))


def export_openvino(
    model: M2Det,
    path: Union[str, Path],
    *,
    input_size: Optional[int] = None,
    fold_batchnorm: bool = True,
    check: bool = True,
    check_batch: int = 2,
    tolerance: float = 1e-4,
    int8: Optional[CalibrationImages] = None,
    calibration_source: str = "",
    float_heads: bool = False,
) -> tuple[ExportReport, Optional[QuantizationReport]]:
    """Write `model` as an OpenVINO IR (`path` .xml and its .bin) with a dynamic batch, the outputs
    of `export_onnx` (no NMS: OpenVINO runs m2det's own post-processing) and the same metadata.

    With `check`, the FP32 IR runs on OpenVINO (f32 inference precision) on `check_batch` images
    and is compared to PyTorch like the ONNX export. With `int8` (calibration images), the checked
    FP32 IR is then quantised with NNCF (`m2det.deploy.openvino_quantize`) and that is written;
    the second value says what the quantisation did (None for FP32).
    """
    from m2det.deploy.openvino_backend import OpenVinoNetwork, save_openvino

    path = Path(path)
    graph = DetectionGraph(model, input_size, fold_batchnorm).cpu()
    size = graph.input_size
    converted = _convert_graph(model, graph)
    report = ExportReport(path=path, format="openvino", outputs=OUTPUT_NAMES)
    quantization: Optional[QuantizationReport] = None
    if int8 is None:
        save_openvino(converted, path)
    if check:
        x = _check_input(graph.network, size, check_batch, seed=1).cpu()
        network = OpenVinoNetwork(path if int8 is None else converted)
        outputs = network.outputs(x, list(OUTPUT_NAMES))
        _compare(report, graph, x, [outputs[name] for name in OUTPUT_NAMES], tolerance)
        report.check_batch = check_batch
    if int8 is not None:
        from m2det.deploy.openvino_quantize import quantize_openvino

        quantized, quantization = quantize_openvino(
            converted, int8, source=calibration_source, float_heads=float_heads
        )
        quantization.path = save_openvino(quantized, path)
    return report, quantization


def read_torchscript_metadata(path: Union[str, Path]) -> dict[str, str]:
    """The metadata that `export_torchscript` stored beside the graph."""
    files = {"m2det.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    if not files["m2det.json"]:
        raise FileFormatError(
            f"{path}: a TorchScript file without m2det metadata (not written by m2det export)"
        )
    return json.loads(files["m2det.json"])
