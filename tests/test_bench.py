"""`m2det bench`: the measurement runs with tiny sizes and writes complete JSON (no timing asserts)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import m2det
from m2det.boxes.coder import BoxCoder
from m2det.boxes.synthesize import synthesize_predictions
from m2det.cli.main import app
from m2det.engine.bench import BenchSettings, run_bench
from m2det.models.complexity import measure
from m2det.utils.memory import PeakMemory
from m2det.utils.timing import Timing

TOP_LEVEL = {
    "model", "config_name", "input_size", "num_classes", "device", "backend", "backend_info", "precision",
    "threads", "params", "gflops_per_image", "latency_batch1", "postprocess_load", "throughput",
    "reference_conv", "peak_memory_method", "settings", "environment",
}  # fmt: skip
TIMING = {"median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "runs"}


def check_result(result: dict, batches: list[int], repeats: int) -> None:
    assert set(result) >= TOP_LEVEL
    json.dumps(result, allow_nan=False)  # plain, finite JSON
    latency = result["latency_batch1"]
    for stage in ("preprocess", "network", "postprocess"):
        assert set(latency[stage]) == TIMING and latency[stage]["runs"] == repeats
        assert 0 < latency[stage]["min_ms"] <= latency[stage]["median_ms"] <= latency[stage]["max_ms"]
    assert latency["total_median_ms"] == pytest.approx(
        sum(latency[s]["median_ms"] for s in ("preprocess", "network", "postprocess"))
    )
    assert [row["batch"] for row in result["throughput"]] == batches
    for row in result["throughput"]:
        assert set(row["network"]) == TIMING
        assert row["images_per_s"] == pytest.approx(row["batch"] * 1e3 / row["network"]["median_ms"])
        ratio = row["network_gflops_per_s"] / row["reference_conv"]["gflops_per_s"]
        assert row["fraction_of_reference"] == pytest.approx(ratio)
        assert math.isfinite(row["peak_memory_mb"])


def test_bench_pytorch_writes_every_field():
    result = run_bench(
        BenchSettings(
            model="m2det_tiny",
            num_classes=4,
            batch_sizes=(2, 1),
            warmup=1,
            repeats=2,
            boxes_above_threshold=150,
        )
    )
    check_result(result, [1, 2], 2)
    assert result["backend_info"]["optimized"] and result["backend_info"]["fold_batchnorm"]
    assert result["gflops_per_image"] == pytest.approx(
        measure(m2det.get_config("m2det_tiny", num_classes=4)).gflops
    )
    load = result["postprocess_load"]
    assert load["boxes_above_threshold"] == 150 and load["source"] == "synthetic"
    assert 0 < load["detections_kept"] <= 150


def test_bench_cli_with_onnxruntime_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench", "--preset", "m2det_tiny", "--num-classes", "3", "--backend", "onnxruntime",
            "--batch", "1", "--warmup", "0", "--repeats", "1", "--boxes", "50", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    check_result(data, [1], 1)
    assert data["backend"] == "onnxruntime" and data["precision"] == "fp32"
    assert "images/s" in result.output and "of ref" in result.output


@pytest.mark.parametrize(("num_above", "threshold"), [(1, 0.05), (1000, 0.05), (700, 0.1), (0, 0.5)])
def test_synthesised_load_has_exactly_the_stated_boxes_above_the_threshold(num_above, threshold):
    anchors = m2det.anchors("m2det320_vgg16")
    coder = BoxCoder()
    loc, logits = synthesize_predictions(anchors, 81, num_above, threshold, coder, seed=1)
    probs = logits.softmax(-1)[0]
    above = probs[:, 1:] > threshold
    assert int(above.sum()) == num_above
    assert int(above.any(1).sum()) == num_above  # one class per predicting anchor
    assert bool((probs[:, 1:][~above] < 1e-3).all())  # the rest is far below any threshold
    if num_above:
        boxes = coder.decode(loc[0][above.any(1)], anchors[above.any(1)])
        assert bool((boxes[:, 2:] > boxes[:, :2]).all())
        assert float(boxes.min()) > -0.1 and float(boxes.max()) < 1.1  # boxes of objects in the image


def test_synthesis_refuses_more_boxes_than_anchors():
    anchors = m2det.anchors("m2det_tiny")
    with pytest.raises(ValueError, match="boxes above the threshold"):
        synthesize_predictions(anchors, 4, anchors.shape[0] + 1, 0.05, BoxCoder())


def test_timing_summary():
    t = Timing.of([0.004, 0.001, 0.003, 0.002, 0.005])
    assert (t.median_ms, t.min_ms, t.max_ms, t.runs) == (
        pytest.approx(3.0),
        pytest.approx(1.0),
        pytest.approx(5.0),
        5,
    )
    assert t.p25_ms == pytest.approx(2.0) and t.p75_ms == pytest.approx(4.0)
    one = Timing.of([0.002])  # a single run: every statistic is that run
    assert (one.median_ms, one.p25_ms, one.p75_ms, one.min_ms, one.max_ms, one.runs) == (
        pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0), 1,
    )  # fmt: skip


def test_run_bench_restores_the_thread_count():
    """torch's thread count is process-wide: a bench run with `threads` must not leave it changed."""
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    settings = BenchSettings(model="m2det_tiny", num_classes=4, batch_sizes=(1,), warmup=0, repeats=1)
    result = run_bench(replace(settings, threads=other, reference=False))
    assert result["threads"] == other and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="preset name"):  # fails after the threads were set
        run_bench(replace(settings, model="weights.pth", threads=other))
    assert torch.get_num_threads() == before


def test_peak_memory_sees_a_large_allocation():
    memory = PeakMemory(torch.device("cpu"))
    if not memory.resettable:
        pytest.skip("the peak resident set cannot be reset on this system")
    memory.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = memory.peak_mb()
    del block
    assert peak >= 60


# ----- every runtime in one run (`m2det bench --backends`) -----
@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A 64-pixel m2det_tiny with BatchNorm statistics as after training, as our model file."""
    import train_helpers
    from m2det.io.checkpoint import save_model

    model = train_helpers.tiny_model(num_classes=4, class_names=["RBC", "WBC", "Platelets"])
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=g) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
    return save_model(model, tmp_path_factory.mktemp("bench") / "tiny.safetensors")


def test_bench_every_runtime_gives_one_complete_row_each(tiny_weights, bccd_root):
    from m2det.engine.bench_runtimes import (
        RUNTIMES,
        RuntimeBenchSettings,
        cpu_supports_bf16,
        run_runtime_bench,
    )

    pytest.importorskip("openvino")
    settings = RuntimeBenchSettings(
        model=str(tiny_weights), batch_sizes=(2, 1), warmup=1, repeats=2, settle_s=0.0,
        data=str(bccd_root), split="test", calib_split="train", calib_num=2,
    )  # fmt: skip
    result = run_runtime_bench(settings)
    json.dumps(result, allow_nan=False)
    assert [row["key"] for row in result["rows"]] == [spec.key for spec in RUNTIMES]
    assert result["baseline"] == "pytorch-eager" and result["batch_sizes"] == [1, 2]
    assert result["data"] == {"data": str(bccd_root), "split": "test", "images": 3}
    for row in result["rows"]:
        if row["key"] == "pytorch-bf16" and not cpu_supports_bf16():
            assert row["status"] == "skipped" and "AVX512-BF16" in row["note"]
            continue
        assert row["status"] == "ok", row
        assert row["size_mb"] > 0
        for batch in ("1", "2"):
            timing = row["timings"][batch]
            assert timing["runs"] == 2 and 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
            assert row["images_per_s"][batch] == pytest.approx(int(batch) * 1e3 / timing["median_ms"])
            baseline = result["rows"][0]["timings"][batch]["median_ms"]
            assert row["speed_vs_baseline"][batch] == pytest.approx(baseline / timing["median_ms"])
        difference = max(row["difference_from_eager"].values())
        if row["precision"] in ("fp32", "winograd"):
            assert difference < 1e-4  # the same network, whatever runs it
        elif row["precision"] == "bf16":
            assert 0 < difference < 0.1  # close, not equal
        else:  # int8 calibrated on 2 images, run on noise: different, still finite
            assert difference > 0 and math.isfinite(difference)
        assert 0 <= row["accuracy"]["AP50"] <= 1 and set(row["accuracy"]) == {"AP50", "AP", "VOC_AP"}
        change = row["accuracy_change_points"]["AP50"]
        assert change == pytest.approx(
            100 * (row["accuracy"]["AP50"] - result["rows"][0]["accuracy"]["AP50"])
        )
        if row["key"].endswith("-int8"):
            assert "calibrated on 2 images of" in row["note"]
    assert result["rows"][0]["speed_vs_baseline"]["1"] == 1.0
    assert result["rows"][0]["difference_from_eager"] == {"loc": 0.0, "logits": 0.0}
    assert result["rows"][0]["accuracy_change_points"] == {"AP50": 0.0, "AP": 0.0}
    assert result["environment"]["openvino"] and "cpu_flags" in result["environment"]


def test_bench_backends_cli_writes_json_csv_and_markdown(tiny_weights, tmp_path, monkeypatch):
    import csv

    import m2det.engine.bench_runtimes as bench_runtimes

    # a CPU without bf16 and no INT8: those rows say why they were skipped
    monkeypatch.setattr(bench_runtimes, "cpu_supports_bf16", lambda: False)
    out = tmp_path / "runtimes.json"
    args = [
        "bench", "--weights", str(tiny_weights), "--backends", "pytorch,onnxruntime", "--no-int8",
        "--batch", "1", "--warmup", "0", "--repeats", "2", "--settle", "0", "--baseline", "pytorch-fast",
        "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    rows = {row["key"]: row for row in data["rows"]}
    assert list(rows) == [
        "pytorch-eager",
        "pytorch-fast",
        "pytorch-winograd",
        "pytorch-bf16",
        "onnxruntime-fp32",
        "onnxruntime-int8",
    ]
    assert rows["pytorch-bf16"]["note"] == "skipped: CPU lacks AVX512-BF16 / AMX-BF16"
    assert rows["onnxruntime-int8"]["note"] == "skipped: INT8 switched off (--no-int8)"
    assert data["baseline"] == "pytorch-fast" and rows["pytorch-fast"]["speed_vs_baseline"]["1"] == 1.0
    with open(out.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["status"] for row in table] == ["ok", "ok", "ok", "skipped", "ok", "skipped"]
    assert float(table[4]["median ms"]) == pytest.approx(
        rows["onnxruntime-fp32"]["timings"]["1"]["median_ms"], abs=0.06
    )
    markdown = out.with_suffix(".md").read_text()
    assert "| runtime | precision | status |" in markdown and markdown.count("\n| ") == 7
    assert "speed vs baseline" in result.output and "ONNX Runtime" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backends", "pytorch,tensorrt"], "--backends: expected all or a comma-separated list"),
        (["--backends", "all", "--backend", "onnxruntime"], "not both"),
        (["--backends", "all", "--weights", "model.onnx"], "builds every runtime from one PyTorch model"),
        (["--backends", "pytorch", "--baseline", "tflite"], "baseline must be one of"),
        (
            ["--backends", "onnxruntime", "--baseline", "pytorch-eager"],
            "baseline pytorch-eager is not measured: its backend pytorch",
        ),
    ],
)
def test_bench_backends_refuses_bad_options(args, message):
    result = CliRunner().invoke(app, ["bench", "--preset", "m2det_tiny", "--repeats", "1", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
