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
