"""The HTTP service answers with the same detections as the Detector it wraps."""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import m2det  # noqa: E402
from image_helpers import bomb_png, save_oriented, truncated_jpeg_bytes, upright_scene  # noqa: E402
from m2det.inference.detector import Detector  # noqa: E402
from m2det.io.checkpoint import save_model  # noqa: E402
from m2det.io.image import read_image  # noqa: E402
from m2det.serve import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    torch.manual_seed(0)
    model = m2det.build_model("m2det_tiny", num_classes=3, class_names=["a", "b"])
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    save_model(model, path)
    return Detector(path, score_threshold=0.01)


def test_detect_matches_the_detector(detector, bccd_root):
    image_path = sorted((bccd_root / "JPEGImages").glob("*.jpg"))[0]
    client = TestClient(create_app(detector, config=ServeConfig(min_score=0.0)))
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
    client = TestClient(create_app(detector, config=ServeConfig(min_score=0.0)))
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


# ----- limits: what a hostile or broken client can cost -----


def jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_413_before_decoding(detector):
    client = TestClient(create_app(detector))
    bomb = bomb_png(10000, 10000)
    assert len(bomb) < 2000
    response = client.post("/detect", content=bomb)
    assert response.status_code == 413
    assert "10000x10000 pixels (100.0 MP) is over the limit of 40 MP" in response.json()["detail"]
    huge = client.post("/detect", content=bomb_png(30000, 30000))  # over Pillow's own limit too
    assert huge.status_code == 413 and "over the limit" in huge.json()["detail"]
    small = TestClient(create_app(detector, config=ServeConfig(max_pixels=1000)))
    assert small.post("/detect", content=jpeg()).status_code == 413  # 64 x 48 > 1000


def test_body_limit_from_content_length_and_while_streaming(detector):
    client = TestClient(create_app(detector, max_image_bytes=1000))
    declared = client.post("/detect", content=b"x" * 10, headers={"content-length": "50000000"})
    assert declared.status_code == 413 and "50000000 bytes exceeds the limit of 1000" in declared.text

    def chunks():  # no Content-Length: chunked, counted as it comes
        for _ in range(100):
            yield b"x" * 100

    streamed = client.post("/detect", content=chunks())
    assert streamed.status_code == 413 and "exceeds the limit of 1000 bytes" in streamed.text


def test_large_image_is_decoded_reduced_and_boxes_come_back_in_its_pixels(detector):
    from m2det.io.image import decode_image

    data = jpeg(1400, 1300)  # shorter side >= 2 x 2 x 320: decoded at half size
    client = TestClient(create_app(detector, config=ServeConfig(min_score=0.0)))
    body = client.post("/detect", content=data).json()
    assert (body["width"], body["height"]) == (1400, 1300)
    expected = detector(decode_image(data, reduce=2))
    assert len(body["detections"]) == len(expected["scores"]) > 0
    boxes = torch.tensor([d["box"] for d in body["detections"]])
    scaled = (expected["boxes"] * 2).clamp(max=torch.tensor([1400, 1300, 1400, 1300]))
    assert torch.allclose(boxes, scaled, atol=0.02)


def test_api_key(detector):
    client = TestClient(create_app(detector, config=ServeConfig(api_key="s3cret")))
    assert client.get("/health").status_code == 200  # open: load balancers probe it
    assert client.post("/detect", content=jpeg()).status_code == 401
    wrong = client.post("/detect", content=jpeg(), headers={"X-API-Key": "guess"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["detail"]
    assert client.get("/model").status_code == 401 and client.get("/metrics").status_code == 401
    assert client.post("/detect", content=jpeg(), headers={"X-API-Key": "s3cret"}).status_code == 200
    bearer = {"Authorization": "Bearer s3cret"}
    assert client.get("/model", headers=bearer).status_code == 200


def test_cors_only_for_the_origins_given(detector):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    closed = TestClient(create_app(detector)).options("/detect", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    app = create_app(detector, config=ServeConfig(cors_origins=("https://app.example",)))
    allowed = TestClient(app).options("/detect", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = TestClient(app).options("/detect", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_multipart_upload_answers_as_the_raw_body(detector):
    client = TestClient(create_app(detector, config=ServeConfig(min_score=0.0)))
    raw = client.post("/detect", content=jpeg()).json()
    form = client.post("/detect", files={"file": ("x.jpg", jpeg(), "image/jpeg")}, data={"note": "hi"})
    assert form.status_code == 200, form.text
    assert form.json()["detections"] == raw["detections"]
    boundary = "b0undary"
    fields_only = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--{boundary}--\r\n'
    )
    nofile = client.post(
        "/detect",
        content=fields_only.encode(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert nofile.status_code == 400 and "curl -F file=@image.jpg" in nofile.json()["detail"]
    text = client.post("/detect", content=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 415 and "curl -F file=@image.jpg" in text.json()["detail"]


def test_default_min_score_is_what_detect_draws(detector):
    client = TestClient(create_app(detector))
    assert client.get("/model").json()["min_score"] == 0.3
    body = client.post("/detect", content=jpeg()).json()
    assert all(d["score"] >= 0.3 for d in body["detections"])
    everything = client.post("/detect?min_score=0", content=jpeg()).json()["detections"]
    assert len(everything) >= len(body["detections"])


def test_timings_and_metrics(detector):
    client = TestClient(create_app(detector))
    body = client.post("/detect", content=jpeg()).json()
    assert body["time_ms"] >= body["queue_ms"] + body["inference_ms"] - 0.05
    assert body["inference_ms"] > 0 and body["batch_size"] == 1
    client.post("/detect", content=b"not an image")
    text = client.get("/metrics").text
    assert 'm2det_requests_total{path="/detect",code="200"} 1' in text
    assert 'm2det_requests_total{path="/detect",code="415"} 1' in text
    assert 'm2det_batch_size_bucket{le="1"} 1' in text and "m2det_batch_size_count 1" in text
    assert "m2det_detect_seconds_count 1" in text and "m2det_queue_depth 0" in text
    assert "# TYPE m2det_inference_seconds histogram" in text and "m2det_in_flight 0" in text


def test_docs_page_offers_a_file_and_loads_nothing_from_a_cdn(detector):
    client = TestClient(create_app(detector))
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/detect"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert "application/octet-stream" in body
    page = client.get("/docs")
    assert page.status_code == 200 and "cdn" not in page.text.lower()
    pytest.importorskip("fastapi_offline")
    assert "/docs-assets/swagger-ui-bundle.js" in page.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_only_loopback_goes_without_a_key_warning():
    from m2det.cli.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


# ----- a real server: connection limits, concurrency -----


@contextmanager
def serving(app, header_timeout_s: float = 10.0):
    """`app` under uvicorn on 127.0.0.1 (a free port) in a thread; yields its address."""
    import uvicorn

    from m2det.serve.server import ServerLimits, server_config

    config = server_config(
        app, "127.0.0.1", 0, ServerLimits(header_timeout_s=header_timeout_s), log_level="info"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield host, port
    finally:
        server.should_exit = True
        thread.join(10)


def raw_reply(sock: socket.socket, within: float) -> bytes:
    """What the server sends until it closes the connection, waiting at most `within` seconds."""
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        data += b"<still open>"
    return data


def test_stalled_headers_and_body_are_cut_off(detector):
    app = create_app(detector, config=ServeConfig(body_timeout_s=1.0))
    with serving(app, header_timeout_s=1.0) as address:
        half_headers = [socket.create_connection(address) for _ in range(3)]
        for sock in half_headers:
            sock.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Le")
        stalled = socket.create_connection(address)
        stalled.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
        start = time.monotonic()
        for sock in half_headers:
            assert raw_reply(sock, 5).startswith(b"HTTP/1.1 408 ")
        reply = raw_reply(stalled, 5)
        assert reply.startswith(b"HTTP/1.1 408 ") and b"not sent within 1 s (100 bytes came)" in reply
        assert time.monotonic() - start < 4
        promised = socket.create_connection(address)  # 50 MB announced: refused before any body
        promised.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
        assert raw_reply(promised, 5).startswith(b"HTTP/1.1 413 ")
        for sock in [*half_headers, stalled, promised]:
            sock.close()


def test_too_many_in_flight_is_503_and_a_client_gone_logs_no_traceback(detector, caplog):
    import httpx

    app = create_app(detector, config=ServeConfig(max_in_flight=1, body_timeout_s=5.0))
    with caplog.at_level(logging.INFO), serving(app) as (host, port):
        holder = socket.create_connection((host, port))
        holder.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10)
        time.sleep(0.3)
        busy = httpx.post(f"http://{host}:{port}/detect", content=jpeg(), timeout=5)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert httpx.get(f"http://{host}:{port}/health", timeout=5).status_code == 200
        holder.close()  # goes away mid-upload
        time.sleep(0.3)
        assert httpx.post(f"http://{host}:{port}/detect", content=jpeg(), timeout=5).status_code == 200
        metrics = httpx.get(f"http://{host}:{port}/metrics", timeout=5).text
    assert 'm2det_requests_total{path="/detect",code="503"} 1' in metrics
    assert 'm2det_requests_total{path="/detect",code="499"} 1' in metrics
    assert 'code="400"' not in metrics and 'code="500"' not in metrics
    assert any("went away" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_concurrent_requests_are_batched_with_the_same_detections(detector):
    import httpx

    images = [jpeg(64 + 8 * i, 48 + 4 * i, seed=i) for i in range(6)]
    single = TestClient(create_app(detector, config=ServeConfig(min_score=0.0, max_batch=1)))
    expected = [single.post("/detect", content=data).json()["detections"] for data in images]
    app = create_app(detector, config=ServeConfig(min_score=0.0, max_batch=8, max_wait_ms=500))
    with serving(app) as (host, port), ThreadPoolExecutor(len(images)) as pool:
        answers = list(
            pool.map(
                lambda d: httpx.post(f"http://{host}:{port}/detect", content=d, timeout=30).json(), images
            )
        )
    assert max(a["batch_size"] for a in answers) > 1
    for answer, want in zip(answers, expected):
        assert [d["label"] for d in answer["detections"]] == [d["label"] for d in want]
        got = torch.tensor([d["box"] for d in answer["detections"]])
        assert torch.allclose(got, torch.tensor([d["box"] for d in want]), atol=0.05)


@pytest.mark.filterwarnings("ignore:no weights given")
def test_cli_builds_the_limits_and_warns_on_an_open_address_without_a_key(monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from m2det.cli.main import app as cli

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: started.append(self.config))
    monkeypatch.delenv("M2DET_API_KEY", raising=False)
    args = ["serve", "--preset", "m2det_tiny", "--host", "0.0.0.0", "--max-batch", "4"]
    result = CliRunner().invoke(cli, [*args, "--max-pixels", "12", "--cors-origin", "https://a.example"])
    assert result.exit_code == 0, result.output
    assert "without an API key" in result.output
    served = started[-1].app  # the FastAPI app uvicorn was given
    assert served.state.config.max_pixels == 12_000_000 and served.state.config.max_batch == 4
    assert served.state.config.cors_origins == ("https://a.example",)
    assert started[-1].timeout_keep_alive == 5 and started[-1].limit_concurrency == 1000
    monkeypatch.setenv("M2DET_API_KEY", "k")
    keyed = CliRunner().invoke(cli, args)
    assert keyed.exit_code == 0 and "without an API key" not in keyed.output
    assert started[-1].app.state.config.api_key == "k"
