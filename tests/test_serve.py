"""The HTTP service answers with the same detections as the Detector it wraps."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import m2det  # noqa: E402
from image_helpers import save_oriented, truncated_jpeg_bytes, upright_scene  # noqa: E402
from m2det.inference.detector import Detector  # noqa: E402
from m2det.io.checkpoint import save_model  # noqa: E402
from m2det.io.image import read_image  # noqa: E402
from m2det.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    torch.manual_seed(0)
    model = m2det.build_model("m2det_tiny", num_classes=3, class_names=["a", "b"])
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    save_model(model, path)
    return Detector(path, score_threshold=0.01)


def test_detect_matches_the_detector(detector, bccd_root):
    image_path = sorted((bccd_root / "JPEGImages").glob("*.jpg"))[0]
    client = TestClient(create_app(detector))
    response = client.post("/detect", content=image_path.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    expected = detector(cv2.imread(str(image_path)))
    assert (body["width"], body["height"]) == (640, 480)
    assert len(body["detections"]) == len(expected["scores"]) > 0
    first = body["detections"][0]
    assert first["box"] == pytest.approx(expected["boxes"][0].tolist(), abs=0.01)
    assert first["name"] in ("a", "b") and first["label"] == int(expected["labels"][0])
    strict = client.post("/detect?min_score=0.5", content=image_path.read_bytes()).json()
    assert all(d["score"] >= 0.5 for d in strict["detections"])
    assert len(strict["detections"]) == int((expected["scores"] >= 0.5).sum())


def test_model_info_and_health(detector):
    client = TestClient(create_app(detector))
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/model").json()
    assert info["name"] == "m2det_tiny" and info["class_names"] == ["a", "b"]


def test_bad_bodies_are_clear_errors(detector):
    client = TestClient(create_app(detector, max_image_bytes=1000))
    assert client.post("/detect", content=b"").status_code == 400
    response = client.post("/detect", content=b"this is not an image")
    assert response.status_code == 415 and "request body: not an image" in response.json()["detail"]
    ok, png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert client.post("/detect", content=png.tobytes()).status_code == 413


def test_truncated_image_is_refused_and_phone_photo_read_upright(detector, tmp_path):
    client = TestClient(create_app(detector))
    response = client.post("/detect", content=truncated_jpeg_bytes())
    assert response.status_code == 400
    assert response.json()["detail"].startswith("request body: truncated or damaged image data")
    photo = save_oriented(tmp_path / "phone.jpg", upright_scene()[0], 6)  # stored 64x48, shown 48x64
    response = client.post("/detect", content=photo.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (48, 64)
    expected = detector(read_image(photo))
    assert len(body["detections"]) == len(expected["scores"]) > 0
    assert body["detections"][0]["box"] == pytest.approx(expected["boxes"][0].tolist(), abs=0.01)
