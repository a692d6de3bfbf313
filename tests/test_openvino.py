"""OpenVINO as a backend: IR export (FP32, INT8 with NNCF), the network seam, Detector and CLI, errors."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("openvino")

import m2det  # noqa: E402
import train_helpers  # noqa: E402
from m2det.cli.main import app  # noqa: E402
from m2det.deploy.calibration import dataset_calibration_images  # noqa: E402
from m2det.deploy.export import export_metadata, export_openvino  # noqa: E402
from m2det.deploy.openvino_backend import OpenVinoNetwork, read_openvino_metadata  # noqa: E402
from m2det.inference import DetectionPipeline, Network  # noqa: E402
from m2det.inference.network import check_backend_choice  # noqa: E402
from m2det.io.checkpoint import save_model  # noqa: E402

CLASSES = ["cat", "dog", "bird"]


def images(model: m2det.M2Det, n: int, seed: int) -> torch.Tensor:
    size = model.config.input_size
    return model.normalize(torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1.0))


@pytest.fixture(scope="module")
def model() -> m2det.M2Det:
    return train_helpers.trained_like(CLASSES)


@pytest.fixture(scope="module")
def ir_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("openvino") / "tiny.xml"
    report, quantization = export_openvino(model, path)
    assert quantization is None and report.format == "openvino" and report.check_batch == 2
    assert max(report.relative_error.values()) < 1e-4
    return path


def test_openvino_fp32_equals_pytorch_at_batch_1_and_3(model, ir_file):
    import openvino as ov
    from openvino.properties import hint

    network = OpenVinoNetwork(ir_file, threads=1)
    assert isinstance(network, Network) and network.quantization is None
    # f32 pinned: on CPUs with AVX512-BF16 or AMX, OpenVINO's own default would be bf16
    assert network.compiled.get_property(hint.inference_precision) == ov.Type.f32
    for batch in (1, 3):
        x = images(model, batch, seed=batch)
        with torch.no_grad():
            want = model.forward_raw(x)
        got = network.forward_raw(x)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == torch.float32
            assert relative_error(a, b) < 1e-4
    everything = network.outputs(images(model, 1, seed=5))
    assert set(everything) == {"boxes", "scores", "loc", "logits"}
    torch.testing.assert_close(everything["scores"].sum(-1), torch.ones(1, everything["scores"].shape[1]))


def test_the_ir_carries_the_onnx_metadata(model, ir_file):
    metadata = read_openvino_metadata(ir_file)
    assert metadata == export_metadata(model, 320, None)  # what the ONNX export writes
    network = OpenVinoNetwork(ir_file)
    assert network.config.categories[1:] == CLASSES and json.loads(metadata["m2det.class_names"]) == CLASSES
    assert network.fixed_input_size == network.input_size == 320
    expected = model.config.to_dict()
    expected["backbone"]["weights"] = None
    assert network.config.to_dict() == expected


def test_int8_calibrates_on_the_data_and_stays_close(model, ir_file, bccd_root, tmp_path):
    from m2det.deploy.openvino_backend import read_openvino_model
    from m2det.deploy.openvino_quantize import quantize_openvino

    calibration = dataset_calibration_images(model.config, 320, bccd_root, "train", num_images=3)
    path = tmp_path / "int8.xml"
    report, quantization = export_openvino(model, path, int8=calibration, calibration_source="bccd train")
    assert report.check_batch == 2 and max(report.relative_error.values()) < 1e-4  # the FP32 IR's check
    assert quantization is not None and quantization.path == path
    fp32_model = read_openvino_model(ir_file)
    convs = sum(  # the network's convolutions (not those on constants alone, folded when compiled)
        op.get_type_name() == "Convolution" and op.input_value(0).get_node().get_type_name() != "Constant"
        for op in fp32_model.get_ordered_ops()
    )
    assert quantization.quantized_ops["Convolution"] == convs  # every conv has int8 weights
    assert {"Exp", "Softmax"} <= set(quantization.float_ops)  # the tail stays in float
    assert "Exp" not in quantization.quantized_ops and "Softmax" not in quantization.quantized_ops

    int8 = OpenVinoNetwork(path)
    assert int8.quantization["calibration_images"] == 3
    assert int8.quantization["calibration_source"] == "bccd train"
    assert read_openvino_metadata(path)["m2det.config"] == model.config.to_json()
    first = torch.from_numpy(next(calibration.batches()))
    with torch.no_grad():
        fp32_logits = model.forward_raw(first)[1]
    int8_logits = int8.forward_raw(first)[1]
    assert float((int8_logits - fp32_logits).abs().mean()) < 0.1 * float(fp32_logits.std())
    corr = np.corrcoef(fp32_logits.flatten().numpy(), int8_logits.flatten().numpy())[0, 1]
    assert corr > 0.99 and math.isfinite(corr)

    # the shared pipeline runs it like any other network
    pipeline = DetectionPipeline(int8, "official")
    rgb = torch.randint(0, 256, (3, 200, 260), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batch, sizes = pipeline.preprocess([rgb])
    direct = pipeline.postprocessor(*int8.forward_raw(batch), pipeline.anchors(320), sizes)[0]
    got = pipeline([rgb])[0]
    assert all(torch.equal(got[key], direct[key]) for key in ("boxes", "scores", "labels"))

    _, heads = quantize_openvino(fp32_model, calibration, float_heads=True)
    assert heads.float_ops["Convolution"] == 12  # the 2 x 6 loc/conf head convs stay in float
    assert heads.quantized_ops["Convolution"] == convs - 12 and heads.settings["heads"] == "float"


def test_detector_and_cli_run_openvino_end_to_end(model, ir_file, bccd_root, tmp_path):
    weights = save_model(model, tmp_path / "tiny.safetensors")
    image = bccd_root / "JPEGImages" / "BloodImage_00000.jpg"
    expected = m2det.Detector(weights)(image)
    for detector in (m2det.Detector(ir_file), m2det.Detector(weights, backend="openvino")):
        assert isinstance(detector.network, OpenVinoNetwork)
        got = detector(image)
        assert len(got["scores"]) == len(expected["scores"]) > 0
        torch.testing.assert_close(got["scores"], expected["scores"], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=1e-3, atol=1e-2)

    runner = CliRunner()
    out = tmp_path / "detect"
    result = runner.invoke(
        app,
        ["detect", str(image), "--weights", str(ir_file), "--out", str(out), "--no-save", "--workers", "0"],
    )
    assert result.exit_code == 0, result.output
    eval_out = tmp_path / "eval"
    args = [
        "eval",
        "--data",
        str(bccd_root),
        "--split",
        "test",
        "--weights",
        str(ir_file),
        "--backend",
        "openvino",
    ]
    result = runner.invoke(app, [*args, "--out", str(eval_out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((eval_out / "metrics.json").read_text())
    assert metrics["runtime"] == "OpenVinoNetwork" and metrics["num_images"] == 3


def test_serve_runs_the_model_on_openvino(ir_file, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    answers = []

    def serve(server: uvicorn.Server) -> None:  # instead of listening: ask the app, inside the command
        answers.append(TestClient(server.config.app).get("/model").json())

    monkeypatch.setattr(uvicorn.Server, "run", serve)
    result = CliRunner().invoke(app, ["serve", "--weights", str(ir_file), "--backend", "openvino"])
    assert result.exit_code == 0, result.output
    assert answers[-1]["runtime"] == "OpenVinoNetwork" and answers[-1]["class_names"] == CLASSES


def test_backend_choice_for_openvino():
    assert check_backend_choice(None, "model.xml") == "openvino"
    assert check_backend_choice("openvino", "model.safetensors") == "openvino"  # converted in memory
    assert check_backend_choice("openvino", None) == "openvino"
    for backend, weights, message in [
        ("openvino", "model.onnx", "an .onnx model runs with --backend onnxruntime, not openvino"),
        ("pytorch", "model.xml", "an .xml model runs with --backend openvino, not pytorch"),
        ("onnxruntime", "model.xml", "an .xml model runs with --backend openvino, not onnxruntime"),
        ("tensorrt", "model.safetensors", "--backend must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_backend_choice(backend, weights)
    result = CliRunner().invoke(app, ["eval", "--data", "x", "--weights", "m.onnx", "--backend", "openvino"])
    assert result.exit_code == 2 and "runs with --backend onnxruntime" in result.output


def test_bad_files_are_clear_errors(ir_file, tmp_path):
    import openvino as ov
    import openvino.opset13 as ops

    with pytest.raises(ValueError, match=r"an OpenVINO model is an \.xml file"):
        OpenVinoNetwork(tmp_path / "model.onnx")
    with pytest.raises(FileNotFoundError, match="OpenVINO model not found"):
        OpenVinoNetwork(tmp_path / "missing.xml")
    lonely = tmp_path / "lonely.xml"
    lonely.write_bytes(ir_file.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"lonely\.bin is missing"):
        OpenVinoNetwork(lonely)
    parameter = ops.parameter([1, 3], np.float32, name="x")
    plain = tmp_path / "plain.xml"
    ov.save_model(ov.Model([ops.relu(parameter)], [parameter], "plain"), str(plain))
    with pytest.raises(ValueError, match="an OpenVINO model without m2det metadata"):
        OpenVinoNetwork(plain)
    with pytest.raises(ValueError, match=r"takes a batch \[N, 3, 320, 320\]"):
        OpenVinoNetwork(ir_file).forward_raw(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x.onnx", "--format", "openvino"], "--format openvino writes an .xml file"),
        (["x.xml", "--nms"], "--nms is for --format onnx or torchscript"),
        (["x.xml", "--int8"], "--int8 needs --calib-data"),
        (
            ["x.xml", "--int8", "--calib-data", "d", "--calib-method", "entropy"],
            "--calib-method is for --format onnx",
        ),
    ],
)
def test_export_cli_refuses_bad_openvino_options(tmp_path, args, message):
    result = CliRunner().invoke(app, ["export", str(tmp_path / args[0]), "--preset", "m2det_tiny", *args[1:]])
    assert result.exit_code == 2 and message in result.output


def test_export_cli_writes_a_checked_ir(model, tmp_path):
    weights = save_model(model, tmp_path / "tiny.safetensors")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "out.xml"), "--weights", str(weights)])
    assert result.exit_code == 0, result.output
    assert "checked against PyTorch at batch 2" in result.output and "(openvino;" in result.output
    assert (tmp_path / "out.bin").stat().st_size > 4 * sum(p.numel() for p in model.parameters()) * 0.9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_missing_packages_name_the_extra(monkeypatch):
    from m2det.deploy.openvino_backend import import_openvino
    from m2det.deploy.openvino_quantize import import_nncf

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(ValueError, match=r'openvino package: pip install "m2det\[openvino\]"'):
        import_openvino()
    with pytest.raises(ValueError, match=r'nncf package: pip install "m2det\[openvino\]"'):
        import_nncf()
    with pytest.raises(ValueError, match=r"m2det\[openvino\]"):
        m2det.Detector("model.xml")
