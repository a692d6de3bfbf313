"""The network seam: every runtime (eager PyTorch, the folded fast path, ONNX Runtime FP32 and
INT8) runs inside the same `DetectionPipeline`, and evaluation takes its settings explicitly."""

from __future__ import annotations

import pytest
import torch

import m2det
import train_helpers
from m2det.boxes.postprocess import OFFICIAL, PAPER
from m2det.deploy import optimize_for_inference
from m2det.inference import DetectionPipeline, Network

CLASSES = ["Platelets", "RBC", "WBC"]  # BCCD's, for evaluation on it


def trained_like(seed: int = 0) -> m2det.M2Det:
    return train_helpers.trained_like(CLASSES, seed)


@pytest.fixture(scope="module")
def model() -> m2det.M2Det:
    return trained_like()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    from m2det.deploy.export import export_onnx

    path = tmp_path_factory.mktemp("seam") / "tiny.onnx"
    export_onnx(model, path)
    return path


def some_images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [
        torch.randint(0, 256, (3, 200, 260), dtype=torch.uint8, generator=g),
        torch.randint(0, 256, (3, 320, 320), dtype=torch.uint8, generator=g),
    ]


def assert_same_detections(got: list[dict], want: list[dict], exact: bool) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert len(a["scores"]) == len(b["scores"]) > 0
        assert torch.equal(a["labels"], b["labels"]) and a["label_names"] == b["label_names"]
        if exact:
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
        else:  # the tolerances of tests/test_deploy.py and tests/test_export.py
            torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-3, atol=0.05)


@pytest.mark.parametrize("runtime", ["eager", "folded", "onnxruntime"])
def test_every_runtime_gives_the_model_forward_detections_through_one_pipeline(model, onnx_file, runtime):
    from m2det.deploy.onnx_backend import OnnxRuntimeNetwork

    network = {
        "eager": lambda: model,
        "folded": lambda: optimize_for_inference(model),
        "onnxruntime": lambda: OnnxRuntimeNetwork(onnx_file),
    }[runtime]()
    assert isinstance(network, Network) and network.config == model.config
    images = some_images()
    with torch.inference_mode():
        want = model(images)  # eval-mode forward, paper settings: today's detections
    got = DetectionPipeline(network, PAPER)(images)
    assert_same_detections(got, want, exact=runtime == "eager")


def test_settings_are_the_pipelines_not_the_models(model):
    images = some_images()
    paper = DetectionPipeline(model)(images)
    model.set_postprocess(OFFICIAL)  # the deprecated convenience reaches `model.forward` alone
    try:
        assert DetectionPipeline(model).settings is PAPER
        assert_same_detections(DetectionPipeline(model)(images), paper, exact=True)
        official = DetectionPipeline(model, "official")(images)
        with torch.inference_mode():
            assert_same_detections(official, model(images), exact=True)
    finally:
        model.postprocessor = None


def test_a_fixed_size_network_refuses_other_sizes_up_front(onnx_file):
    from m2det.deploy.onnx_backend import OnnxRuntimeNetwork

    network = OnnxRuntimeNetwork(onnx_file)
    assert network.fixed_input_size == network.input_size == 320 and network.device.type == "cpu"
    assert DetectionPipeline(network).sizes == [320]
    with pytest.raises(ValueError, match="exported for input size 320, cannot run at 384"):
        DetectionPipeline(network, sizes=[320, 384])


def test_evaluate_does_not_read_a_postprocessor_left_on_the_model(bccd_root):
    from m2det.data import build_dataset
    from m2det.engine.evaluate import evaluate

    model = trained_like(seed=1)
    dataset = build_dataset(bccd_root, "test", keep_ignored=True)
    kwargs = {"batch_size": 2, "max_images": 2, "progress": False}
    before = evaluate(model, dataset, **kwargs)
    strict = PAPER.replace(score_threshold=0.5, nms="hard", max_per_image=10)
    model.set_postprocess(strict)
    after = evaluate(model, dataset, **kwargs)
    assert len(before.detections_coco) > 0 and after.detections_coco == before.detections_coco
    assert after.metrics == before.metrics
    # the same settings given explicitly do change the result: the check above can fail
    explicit = evaluate(model, dataset, settings=strict, **kwargs)
    assert len(explicit.detections_coco) <= 20 < len(before.detections_coco)


def test_evaluate_runs_an_onnx_network_like_the_model(bccd_root, onnx_file, model):
    from m2det.data import build_dataset
    from m2det.deploy.onnx_backend import OnnxRuntimeNetwork
    from m2det.engine.evaluate import evaluate

    dataset = build_dataset(bccd_root, "test", keep_ignored=True)
    kwargs = {"batch_size": 2, "max_images": 2, "progress": False, "settings": "official"}
    want = evaluate(model, dataset, **kwargs)
    got = evaluate(OnnxRuntimeNetwork(onnx_file), dataset, **kwargs)
    assert len(got.detections_coco) == len(want.detections_coco) > 0
    for a, b in zip(got.detections_coco, want.detections_coco):
        assert a["category_id"] == b["category_id"] and a["image_id"] == b["image_id"]
        assert abs(a["score"] - b["score"]) <= 1e-3 * b["score"] + 1e-4
