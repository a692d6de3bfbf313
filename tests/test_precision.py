"""Reduced precision on the CPU: detecting bfloat16 support, refusing it where it would be emulated,
and bf16 inference through `optimize_for_inference`, `Detector`, `m2det detect` and `m2det eval`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import m2det
from m2det import device as device_module
from m2det.cli.main import app
from m2det.deploy import OptimizedNetwork, optimize_for_inference
from m2det.device import cpu_flags, cpu_supports_bf16, cpu_supports_fp16
from m2det.errors import M2DetError
from test_deploy import batch_of_images, with_trained_statistics

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
flags\t\t: fpu sse2 avx2 {extra}
bogomips\t: 4000.00

processor\t: 1
flags\t\t: fpu sse2 avx2 {extra}
"""

needs_bf16 = pytest.mark.skipif(
    not cpu_supports_bf16(), reason="this CPU lacks AVX512-BF16/AMX: bf16 would be emulated and is refused"
)


@pytest.mark.parametrize(
    ("extra", "bf16", "fp16"),
    [
        ("avx512f avx512_vnni", False, False),
        ("avx512f avx512_bf16", True, False),
        ("amx_tile amx_bf16 amx_int8 avx512_fp16", True, True),
        ("avx512_bf16x", False, False),  # whole flags only
    ],
)
def test_cpu_support_comes_from_the_cpuinfo_flags(extra, bf16, fp16):
    text = CPUINFO.format(vendor="GenuineIntel", extra=extra)
    assert cpu_flags(text) == frozenset(["fpu", "sse2", "avx2", *extra.split()])
    assert cpu_supports_bf16(text) is bf16
    assert cpu_supports_fp16(text) is fp16


def test_without_cpuinfo_torch_detection_decides(monkeypatch, tmp_path):
    monkeypatch.setattr(device_module, "CPUINFO", tmp_path / "missing")
    assert cpu_flags() is None and cpu_flags("processor : 0\n") is None
    for answer in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda answer=answer: answer)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert cpu_supports_bf16() is answer


def test_the_real_cpuinfo_is_read(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text(CPUINFO.format(vendor="AuthenticAMD", extra="avx512_bf16"))
    monkeypatch.setattr(device_module, "CPUINFO", fake)
    assert cpu_supports_bf16() and not cpu_supports_fp16()


def test_bf16_on_a_cpu_without_it_is_refused_naming_what_is_missing(monkeypatch):
    import m2det.deploy.optimize as optimize

    monkeypatch.setattr(optimize, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(optimize, "cpu_supports_fp16", lambda: False)
    model = m2det.build_model("m2det_tiny", num_classes=4).eval()
    with pytest.raises(M2DetError, match="lacks AVX512-BF16 and AMX.*emulated"):
        optimize_for_inference(model, precision="bf16")
    with pytest.raises(M2DetError, match="lacks AVX512-FP16"):
        optimize_for_inference(model, precision="fp16")
    with pytest.raises(M2DetError, match="lacks AVX512-BF16"):  # the Detector says the same
        m2det.Detector(preset="m2det_tiny", precision="bf16")


@needs_bf16
def test_bf16_forward_is_close_to_fp32_and_returns_float32(one_thread):
    model = with_trained_statistics(m2det.build_model("m2det_tiny", num_classes=4))
    x = batch_of_images(model, 2)
    with torch.no_grad():
        expected = model.forward_raw(x)
    fast = optimize_for_inference(model, precision="bf16")
    assert fast.options.weights_converted and fast.options.precision == "bf16"
    assert fast.model.head.loc[1].weight_dtype == torch.bfloat16  # converted once, not per call
    assert fast.dtype == torch.float32  # it takes the pipeline's float32 batch
    for actual, reference in zip(fast.forward_raw(x), expected):
        assert actual.dtype == torch.float32 and actual.shape == reference.shape
        # bf16 keeps 8 significant bits: ~0.4% per rounding, a few % after a deep network
        scale = reference.abs().max()
        assert (actual - reference).abs().max() <= 0.05 * scale
        assert (actual - reference).abs().mean() <= 0.01 * reference.abs().mean()
        assert not torch.equal(actual, reference)  # it did run in reduced precision


def test_precision_with_an_onnx_model_is_refused(tmp_path):
    result = CliRunner().invoke(
        app, ["detect", str(tmp_path), "--weights", str(tmp_path / "model.onnx"), "--precision", "bf16"]
    )
    assert result.exit_code != 0
    assert "--precision bf16" in result.output and "ONNX Runtime" in result.output
    result = CliRunner().invoke(app, ["detect", str(tmp_path), "--precision", "int8"])
    assert result.exit_code != 0 and "--precision must be one of fp32, winograd, fp16, bf16" in result.output


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from m2det.io.checkpoint import save_model

    torch.manual_seed(0)
    model = m2det.build_model("m2det_tiny", num_classes=4, class_names=["Platelets", "RBC", "WBC"])
    return save_model(with_trained_statistics(model), tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@needs_bf16
def test_detect_and_eval_run_in_bf16_end_to_end(bccd_root, tiny_weights, tmp_path, one_thread):
    detector = m2det.Detector(tiny_weights, precision="bf16", score_threshold=0.05)
    reference = m2det.Detector(tiny_weights, score_threshold=0.05)
    assert isinstance(detector.network, OptimizedNetwork)
    image = sorted((bccd_root / "JPEGImages").glob("*.jpg"))[0]
    found, expected = detector(image), reference(image)
    assert len(found["scores"]) > 0
    # the best boxes agree with fp32's to within bf16's rounding
    torch.testing.assert_close(found["scores"][:5], expected["scores"][:5], rtol=0.05, atol=0.02)

    out = tmp_path / "detect"
    args = [str(image), "--weights", str(tiny_weights), "--precision", "bf16", "--out", str(out)]
    result = CliRunner().invoke(app, ["detect", *args, "--score", "0.05", "--no-save"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "detect_run.json").read_text())["precision"] == "bf16"
    assert json.loads((out / "detections.json").read_text())["images"][0]["detections"]

    out = tmp_path / "eval"
    data = ["--data", str(bccd_root), "--split", "test", "--device", "cpu", "--weights", str(tiny_weights)]
    result = CliRunner().invoke(app, ["eval", *data, "--precision", "bf16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "bf16" and metrics["num_images"] == 3
    assert 0.0 <= metrics["metrics"]["AP50"] <= 1.0
