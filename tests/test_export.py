"""Export (ONNX, TorchScript), ONNX Runtime as a backend, and INT8 quantisation, on m2det_tiny."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torchvision.ops import nms
from typer.testing import CliRunner

import m2det
import train_helpers
from m2det.cli.main import app
from m2det.config import ModelConfig
from m2det.deploy.export import GraphNMS, export_onnx, export_torchscript, read_torchscript_metadata
from m2det.deploy.onnx_backend import OnnxRuntimeNetwork, read_onnx_metadata

CLASSES = ["cat", "dog", "bird"]
NMS = GraphNMS(score_threshold=0.3, iou_threshold=0.5, max_per_class=10)


def trained_like(seed: int = 0) -> m2det.M2Det:
    return train_helpers.trained_like(CLASSES, seed)


def images(model: m2det.M2Det, n: int, seed: int) -> torch.Tensor:
    return model.normalize(torch.rand(n, 3, 320, 320, generator=torch.Generator().manual_seed(seed)))


def reference_outputs(model: m2det.M2Det, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the graph must compute, written out here: SSD decoding with variances, then softmax."""
    with torch.no_grad():
        loc, logits = model.forward_raw(x)
    anchors = m2det.anchors(model.config)
    v0, v1 = model.config.anchors.variances
    centre = anchors[:, :2] + loc[..., :2] * v0 * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(loc[..., 2:] * v1)
    boxes = torch.cat([centre - size / 2, centre - size / 2 + size], dim=-1)
    return {"boxes": boxes, "scores": logits.softmax(-1), "loc": loc, "logits": logits}


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, settings: GraphNMS) -> list[tuple]:
    """(image, label, score, box) per kept box, per image and class, in that order."""
    kept = []
    for image in range(boxes.shape[0]):
        for label in range(1, scores.shape[2]):
            s = scores[image, :, label]
            candidates = torch.nonzero(s > settings.score_threshold).squeeze(1)
            keep = candidates[nms(boxes[image, candidates], s[candidates], settings.iou_threshold)]
            for index in keep[: settings.max_per_class].tolist():
                kept.append((image, label, float(s[index]), boxes[image, index]))
    return kept


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().clamp(min=1.0)
    assert float((actual - expected).abs().max() / scale) <= rtol


@pytest.fixture(scope="module")
def model() -> m2det.M2Det:
    return trained_like()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export_onnx(model, path, nms=NMS)
    assert report.check_batch == 2 and max(report.relative_error.values()) < 1e-4
    return path


def test_onnx_matches_pytorch_at_batch_1_and_3(model, onnx_file):
    runtime = OnnxRuntimeNetwork(onnx_file)
    for batch, seed in ((1, 10), (3, 11)):
        x = images(model, batch, seed)
        expected = reference_outputs(model, x)
        got = runtime.outputs(x)
        for name in ("boxes", "scores", "loc", "logits"):
            assert got[name].shape == expected[name].shape == (batch, 12_810, 4)
            assert_close_relative(got[name], expected[name])
        assert torch.allclose(got["scores"].sum(-1), torch.ones(batch, 12_810), atol=1e-5)


def test_onnx_file_describes_its_input_and_outputs(model, onnx_file):
    meta = read_onnx_metadata(onnx_file)
    assert ModelConfig.from_dict(json.loads(meta["m2det.config"])) == model.config
    assert json.loads(meta["m2det.class_names"]) == CLASSES
    assert "BGR" in meta["m2det.input"] and "104, 117, 123" in meta["m2det.input"]
    assert meta["m2det.input_size"] == "320" and json.loads(meta["m2det.nms"])["max_per_class"] == 10
    graph = onnx.load(str(onnx_file)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # the batch is dynamic
    assert [d.dim_value for d in dims[1:]] == [3, 320, 320]
    assert [o.name for o in graph.output][:4] == ["boxes", "scores", "loc", "logits"]


def test_onnx_nms_keeps_what_per_class_nms_keeps(model, onnx_file):
    runtime = OnnxRuntimeNetwork(onnx_file)
    out = runtime.outputs(images(model, 2, 12))
    expected = reference_nms(out["boxes"], out["scores"], NMS)
    assert len(expected) > 0
    assert out["det_boxes"].shape == (len(expected), 4)
    assert out["det_batch_index"].tolist() == [e[0] for e in expected]
    assert out["det_labels"].tolist() == [e[1] for e in expected]
    torch.testing.assert_close(out["det_scores"], torch.tensor([e[2] for e in expected]))
    torch.testing.assert_close(out["det_boxes"], torch.stack([e[3] for e in expected]))


def test_torchscript_matches_pytorch_and_the_onnx_nms(model, onnx_file, tmp_path):
    path = tmp_path / "tiny.pt"
    report = export_torchscript(model, path, nms=NMS)
    assert report.check_batch == 3
    assert json.loads(read_torchscript_metadata(path)["m2det.class_names"]) == CLASSES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch 2.x
        scripted = torch.jit.load(str(path))
    x = images(model, 2, 12)
    got = scripted(x)
    assert not got[0].requires_grad
    expected = reference_outputs(model, x)
    for value, name in zip(got[:4], ("boxes", "scores", "loc", "logits")):
        assert_close_relative(value, expected[name])
    onnx_out = OnnxRuntimeNetwork(onnx_file).outputs(x)
    assert got[6].tolist() == onnx_out["det_labels"].tolist()
    assert got[7].tolist() == onnx_out["det_batch_index"].tolist()
    torch.testing.assert_close(got[5], onnx_out["det_scores"], rtol=1e-4, atol=1e-5)


def test_detector_runs_the_onnx_model_like_the_pytorch_one(model, onnx_file, tmp_path):
    from m2det.io.checkpoint import save_model

    weights = save_model(model, tmp_path / "tiny.safetensors")
    image = torch.randint(
        0, 256, (3, 200, 260), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    expected = m2det.Detector(weights, settings="official")(image)
    onnx_detector = m2det.Detector(onnx_file, settings="official")
    got = onnx_detector(image)
    # the graph is the whole network: no PyTorch module holds any of it
    assert isinstance(onnx_detector.network, OnnxRuntimeNetwork) and not isinstance(
        onnx_detector.network, nn.Module
    )
    assert onnx_detector.class_names == CLASSES
    assert len(got["scores"]) == len(expected["scores"]) > 0
    torch.testing.assert_close(got["scores"], expected["scores"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=1e-3, atol=0.05)
    with pytest.raises(ValueError, match="exported for input size 320"):
        m2det.Detector(onnx_file, sizes=[512])(image)


def test_a_model_exported_at_another_size_runs_at_that_size(model, tmp_path):
    from m2det.io.checkpoint import save_model

    path = tmp_path / "tiny384.onnx"
    export_onnx(model, path, input_size=384)
    image = torch.randint(
        0, 256, (3, 200, 260), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)
    )
    onnx_detector = m2det.Detector(path, settings="official")
    assert onnx_detector.network.fixed_input_size == 384 and onnx_detector.sizes == [384]
    expected = m2det.Detector(
        save_model(model, tmp_path / "tiny.safetensors"), sizes=[384], settings="official"
    )
    got, want = onnx_detector(image), expected(image)
    assert len(got["scores"]) == len(want["scores"]) > 0
    torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-3, atol=1e-4)


def test_int8_calibrates_on_the_data_and_quantises_every_conv(bccd_root, onnx_file, tmp_path):
    from m2det.data import build_dataset, build_eval_transform
    from m2det.deploy.quantize import calibration_reader, quantize_onnx

    reader = calibration_reader(onnx_file, bccd_root, "train", num_images=3, seed=0)
    first = reader.get_next()["images"]
    # the first calibration image prepared by hand: eval resize, RGB -> BGR, 0..255 minus the means
    dataset = build_dataset(bccd_root, "train", transforms=build_eval_transform(320))
    image, _ = dataset[reader.indices[0]]
    bgr = torch.as_tensor(image).as_subclass(torch.Tensor).flip(0).float()
    manual = (bgr - torch.tensor([104.0, 117.0, 123.0]).view(3, 1, 1))[None].numpy()
    np.testing.assert_allclose(first, manual, atol=1e-3)
    assert sum(1 for _ in iter(reader.get_next, None)) == 2
    reader.rewind()

    report = quantize_onnx(onnx_file, tmp_path / "int8.onnx", reader, source="bccd train")
    convs = sum(node.op_type == "Conv" for node in onnx.load(str(onnx_file)).graph.node)
    assert report.quantized_ops["Conv"] == convs
    assert "Softmax" in report.float_ops and "Exp" in report.float_ops  # the tail stays in float
    meta = read_onnx_metadata(tmp_path / "int8.onnx")
    assert json.loads(meta["m2det.quantization"])["calibration_images"] == 3
    assert meta["m2det.config"] == read_onnx_metadata(onnx_file)["m2det.config"]

    fp32, int8 = OnnxRuntimeNetwork(onnx_file), OnnxRuntimeNetwork(tmp_path / "int8.onnx")
    x = torch.from_numpy(first)
    fp32_logits, int8_logits = fp32.forward_raw(x)[1], int8.forward_raw(x)[1]
    spread = float(fp32_logits.std())
    assert float((int8_logits - fp32_logits).abs().mean()) < 0.1 * spread
    corr = np.corrcoef(fp32_logits.flatten().numpy(), int8_logits.flatten().numpy())[0, 1]
    assert corr > 0.99 and math.isfinite(corr)

    # INT8 is one more runtime behind the network seam: the shared pipeline runs it as it is
    from m2det.inference import DetectionPipeline, Network

    assert isinstance(int8, Network) and int8.quantization["calibration_images"] == 3
    assert fp32.quantization is None
    pipeline = DetectionPipeline(int8, "official")
    rgb = torch.as_tensor(image).as_subclass(torch.Tensor)
    batch, sizes = pipeline.preprocess([rgb])
    np.testing.assert_allclose(batch.numpy(), first, atol=1e-3)  # as calibration prepared it
    direct = pipeline.postprocessor(*int8.forward_raw(batch), pipeline.anchors(320), sizes)[0]
    got = pipeline([rgb])[0]
    assert all(torch.equal(got[key], direct[key]) for key in ("boxes", "scores", "labels"))

    reader.rewind()
    heads = quantize_onnx(
        onnx_file, tmp_path / "int8_heads.onnx", reader, calibration="percentile", float_heads=True
    )
    # the 2 x 6 loc/conf head convs stay in float, every other conv is quantised
    assert heads.float_ops["Conv"] == 12
    assert heads.quantized_ops["Conv"] == convs - 12
    assert heads.settings["heads"] == "float" and "percentile" in heads.settings["activations"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "--format must be one of"),
        (["--format", "torchscript", "--int8"], "--int8 is for --format onnx"),
        (["--int8"], "--int8 needs --calib-data"),
        (["--int8", "--calib-data", "x", "--calib-method", "mse"], "--calib-method must be one of"),
    ],
)
def test_export_cli_refuses_bad_options(tmp_path, args, message):
    result = CliRunner().invoke(app, ["export", str(tmp_path / "x.onnx"), "--preset", "m2det_tiny", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_backend_choice_needs_an_onnx_file():
    from m2det.inference.network import check_backend_choice

    assert check_backend_choice(None, "model.onnx") == "onnxruntime"
    assert check_backend_choice(None, "model.safetensors") == "pytorch"
    with pytest.raises(ValueError, match="export one first"):
        check_backend_choice("onnxruntime", "model.safetensors")
    with pytest.raises(ValueError, match="runs with --backend onnxruntime"):
        check_backend_choice("pytorch", "model.onnx")


def test_export_check_accepts_overflow_only_where_pytorch_overflows(tmp_path):
    # untrained heads can push the box decoding's exp past float range; the check must still compare
    model = trained_like(seed=1)
    with torch.no_grad():
        model.head.loc[0].bias.fill_(2000.0)
    report = export_onnx(model, tmp_path / "overflow.onnx")
    assert all(math.isfinite(error) for error in report.relative_error.values())
    assert max(report.relative_error.values()) < 1e-4
