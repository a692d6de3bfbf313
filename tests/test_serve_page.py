"""The web page at `/`, driven in a real browser: an image uploaded through it comes back with its
boxes drawn where the JSON answer puts them, and the score slider hides the low ones.

Needs Playwright for Python (the `dev` extra) and a Chromium on PATH (Debian: `apt-get install
chromium`); Playwright's own browser download is never used. With `M2DET_PAGE_SCREENSHOT=path` the
page with its boxes is saved there (docs/serve-page.png is made so).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from m2det.inference.detector import Detector  # noqa: E402
from m2det.io.checkpoint import save_model  # noqa: E402
from m2det.serve import create_app  # noqa: E402
from m2det.serve.app import ServeConfig  # noqa: E402
from train_helpers import tiny_model  # noqa: E402

CLASSES = ["RBC", "WBC", "Platelets"]
IMAGE = "BloodImage_00000"
IMAGE_WIDTH = 640  # its width in pixels


def annotated_boxes(root: Path, name: str) -> tuple[list[list[float]], list[int]]:
    """The VOC boxes and 1-based labels of one BCCD image."""
    boxes, labels = [], []
    for obj in ET.parse(root / "Annotations" / f"{name}.xml").getroot().iter("object"):
        box = obj.find("bndbox")
        assert box is not None
        boxes.append([float(box.findtext(k, "0")) for k in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(CLASSES.index(obj.findtext("name", "")) + 1)
    return boxes, labels


class AnnotationDetector(Detector):
    """A real `Detector` (a tiny seeded model, loaded from its file) whose answer is fixed: the
    BCCD image's annotated boxes with scores spread over 0.95 ... 0.05.

    Random weights give saturated scores and empty boxes, useless for checking a slider and
    positions; the page is what is tested here, the detections only have to be known and varied.
    """

    def __init__(self, weights: Path, boxes: list[list[float]], labels: list[int]) -> None:
        super().__init__(weights, score_threshold=0.01)
        count = len(boxes)
        self.fixed = {
            "boxes": torch.tensor(boxes),
            "scores": torch.linspace(0.95, 0.05, count),
            "labels": torch.tensor(labels),
            "label_names": [CLASSES[label - 1] for label in labels],
        }

    def detect(self, images: Any) -> list[dict]:  # what the service's batch worker calls
        # in the pixels of the image given: the service decodes a large image reduced (here 640 px
        # wide for a 64-px network: by 2) and scales the boxes back to the original's
        return [
            {**self.fixed, "boxes": self.fixed["boxes"] * image.shape[-1] / IMAGE_WIDTH} for image in images
        ]


@pytest.fixture(scope="module")
def server(tmp_path_factory, bccd_root):
    """The real app under uvicorn on 127.0.0.1 (a free port), in a thread; its base URL."""
    weights = tmp_path_factory.mktemp("page") / "tiny.safetensors"
    save_model(tiny_model(num_classes=len(CLASSES) + 1, class_names=CLASSES), weights)
    detector = AnnotationDetector(weights, *annotated_boxes(bccd_root, IMAGE))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(detector, config=ServeConfig(min_score=0.01)), log_level="warning", lifespan="off"
    )
    app_server = uvicorn.Server(config)
    thread = threading.Thread(target=app_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not app_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    app_server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    """Chromium from PATH, driven by Playwright; the browser tests skip, saying why, without either."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip(
            "no Chromium on PATH (Debian: apt-get install chromium); Playwright's download is not used"
        )
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    # narrow enough that the 640-pixel image is shown smaller than it is
    context = browser.new_context(viewport={"width": 900, "height": 800})
    page = context.new_page()
    yield page
    context.close()


def test_page_and_its_files_are_served(server):
    """Without a browser: the page, its script and style sheet come from the package, nothing else."""
    index = httpx.get(server + "/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert '<script src="page/page.js">' in index.text and "http" not in index.text  # no CDN
    for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
        response = httpx.get(f"{server}/page/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert "http:" not in response.text and "https:" not in response.text
    assert httpx.get(server + "/page/..%2Fpage.py").status_code == 404
    assert "/" not in httpx.get(server + "/openapi.json").json()["paths"]


def drawn(page) -> list[dict[str, Any]]:
    """Every box element: its data attributes, visibility and rectangle in the page's pixels (a
    hidden box's from its style: its place in the overlay, which covers the image exactly)."""
    return page.eval_on_selector_all(
        "#boxes .box",
        """els => els.map(e => {
            const o = e.parentElement.getBoundingClientRect();
            const visible = getComputedStyle(e).display !== 'none';
            const r = visible ? e.getBoundingClientRect() : {
                left: o.left + parseFloat(e.style.left), top: o.top + parseFloat(e.style.top),
                width: parseFloat(e.style.width), height: parseFloat(e.style.height)};
            return {index: Number(e.dataset.index), score: Number(e.dataset.score), name: e.dataset.name,
                    x: r.left, y: r.top, w: r.width, h: r.height, visible: visible};
        })""",
    )


def image_rect(page) -> list[float]:
    """The displayed image's rectangle, checked to be the boxes' overlay's too."""
    rects = page.eval_on_selector_all(
        "#photo, #boxes",
        "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })",
    )
    assert rects[0] == pytest.approx(rects[1], abs=0.5)
    return rects[0]


def test_page_draws_the_answer_and_the_slider_filters(server, page, bccd_root):
    image = bccd_root / "JPEGImages" / f"{IMAGE}.jpg"
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model-name').textContent.startsWith('m2det_tiny')")
    assert page.locator("#classes li .name").all_inner_texts() == CLASSES

    # the service's answer as it went over the wire (the route passes it through unchanged)
    sent: list[dict[str, Any]] = []

    def capture(route):
        response = route.fetch()
        sent.append({"headers": route.request.headers, "status": response.status, "json": response.json()})
        route.fulfill(response=response)

    page.route("**/detect", capture)
    page.fill("#api-key", "secret-key")
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#boxes[data-state=drawn]", state="attached")
    assert len(sent) == 1 and sent[0]["status"] == 200
    assert sent[0]["headers"].get("x-api-key") == "secret-key"
    answer = sent[0]["json"]
    count = len(annotated_boxes(bccd_root, IMAGE)[0])
    assert len(answer["detections"]) == count > 10 and (answer["width"], answer["height"]) == (640, 480)

    # every detection is drawn where the answer puts it, scaled to the displayed image
    left, top, width, height = image_rect(page)
    assert 300 < width < 630 and abs(width / height - 640 / 480) < 0.01  # scaled down, aspect kept
    sx, sy = width / answer["width"], height / answer["height"]
    boxes = drawn(page)
    assert [b["index"] for b in boxes] == list(range(len(answer["detections"])))
    for box, detection in zip(boxes, answer["detections"]):
        x1, y1, x2, y2 = detection["box"]
        assert box["name"] == detection["name"] and box["score"] == pytest.approx(detection["score"])
        assert box["x"] == pytest.approx(left + x1 * sx, abs=1)
        assert box["y"] == pytest.approx(top + y1 * sy, abs=1)
        assert box["w"] == pytest.approx((x2 - x1) * sx, abs=1)
        assert box["h"] == pytest.approx((y2 - y1) * sy, abs=1)
        assert box["visible"] == (detection["score"] >= 0.5)  # the slider starts at 0.5

    # the slider hides the boxes under it, without asking the service again
    for threshold in (0.0, 0.7, 1.0):
        page.eval_on_selector(
            "#min-score", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(threshold)
        )
        boxes = drawn(page)
        expected = [d["score"] >= threshold for d in answer["detections"]]
        assert [b["visible"] for b in boxes] == expected
        assert page.inner_text("#shown") == f"{sum(expected)} of {count} detections shown"
    assert len(sent) == 1
    assert page.inner_text("#timing dd[data-key=time_ms]").endswith(" ms")

    # the boxes follow the image when the window grows (the image then shown at its own size)
    page.set_viewport_size({"width": 1400, "height": 900})
    page.wait_for_function(
        """() => {
            const p = document.getElementById('photo'), b = document.querySelector('#boxes .box');
            return p.clientWidth === 640 && parseFloat(b.style.left) === Number(b.dataset.box.split(',')[0]);
        }"""
    )
    left, top, width, height = image_rect(page)
    for box, detection in zip(drawn(page), answer["detections"]):
        x1, y1, x2, y2 = detection["box"]
        assert (
            width == 640
            and box["x"] == pytest.approx(left + x1, abs=1)
            and box["y"] == pytest.approx(top + y1, abs=1)
        )
        assert box["w"] == pytest.approx(x2 - x1, abs=1) and box["h"] == pytest.approx(y2 - y1, abs=1)


def test_page_shows_errors_and_extra_timings(server, page, bccd_root, tmp_path):
    page.goto(server + "/")
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not an image")
    page.set_input_files("#file", str(not_an_image))
    page.wait_for_selector("#boxes[data-state=error]", state="attached")
    error = page.inner_text("#error")
    assert "HTTP 415" in error and "not an image" in error
    assert page.is_hidden("#photo")  # no broken-image icon

    # a later service adds fields (queue and inference times, anything else): the page still draws
    def with_more_fields(route):
        response = route.fetch()
        body = response.json()
        body.update(queue_ms=1.5, inference_ms=20.25, batch_size=4, extra={"nested": True})
        route.fulfill(response=response, json=body)

    page.route("**/detect", with_more_fields)
    # this time the image is dropped on the page, as a file dragged from the desktop is
    data = base64.b64encode((bccd_root / "JPEGImages" / f"{IMAGE}.jpg").read_bytes()).decode()
    page.eval_on_selector(
        "#drop",
        """(zone, data) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'dropped.jpg', {type: 'image/jpeg'}));
            zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        data,
    )
    page.wait_for_selector("#boxes[data-state=drawn]", state="attached")
    assert page.is_hidden("#error")
    assert page.inner_text("#timing dd[data-key=queue_ms]") == "1.5 ms"
    assert page.inner_text("#timing dd[data-key=inference_ms]") == "20.3 ms"
    assert page.locator("#boxes .box").count() == len(annotated_boxes(bccd_root, IMAGE)[0])
    assert page.inner_text("#status").startswith("dropped.jpg: 640×480 px")
    shot = os.environ.get("M2DET_PAGE_SCREENSHOT")
    if shot:
        page.set_viewport_size({"width": 1100, "height": 660})
        page.eval_on_selector("#min-score", "e => { e.value = '0.3'; e.dispatchEvent(new Event('input')); }")
        page.screenshot(path=shot)
