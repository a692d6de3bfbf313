"""The Detector API, multi-scale/flip testing, drawing and `m2det detect` on images and a video."""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import m2det
from m2det.boxes.postprocess import PAPER
from m2det.cli.common import next_run_dir
from m2det.cli.main import app
from m2det.inference.pipeline import mirror_boxes
from m2det.inference.sources import resolve_source
from m2det.io import jsonfile
from m2det.io.image import to_rgb_tensor
from m2det.io.jsonfile import read_json_lines
from m2det.visualize import class_color, draw_detections, label_text

TINY = "m2det_tiny"


def tiny_detector(**kwargs) -> m2det.Detector:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m2det.Detector(preset=TINY, **kwargs)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return tiny_detector(score_threshold=0.3)


@pytest.fixture(scope="module")
def bccd_image(bccd_root):
    return sorted((bccd_root / "JPEGImages").glob("*.jpg"))[0]


def equal_results(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


# ----- the Python API -----
def test_detector_accepts_paths_pil_numpy_and_tensors(detector, bccd_image):
    bgr = cv2.imread(str(bccd_image))
    rgb_tensor = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1)
    # every input kind becomes the same RGB tensor (numpy is OpenCV's BGR)
    for other in (str(bccd_image), bccd_image, bgr, Image.open(bccd_image)):
        assert torch.equal(to_rgb_tensor(other), rgb_tensor)
    gray = bgr[..., 0]
    assert torch.equal(to_rgb_tensor(gray), torch.from_numpy(gray)[None].expand(3, -1, -1))
    from_path = detector(str(bccd_image))
    assert isinstance(from_path, dict) and len(from_path["boxes"]) > 0
    assert equal_results(from_path, detector(rgb_tensor))
    h, w = bgr.shape[:2]
    assert (from_path["boxes"][:, 0::2] <= w).all() and (from_path["boxes"][:, 1::2] <= h).all()
    assert from_path["label_names"] == [detector.class_names[i - 1] for i in from_path["labels"].tolist()]
    assert len(detector.class_names) == detector.model.num_classes - 1


def test_detector_batches_like_single_images(detector, bccd_image):
    bgr = cv2.imread(str(bccd_image))
    small = cv2.resize(bgr, (200, 150))
    singles = [detector(small), detector(bgr)]
    detector.batch_size = 2
    try:
        batched = detector([small, bgr])
    finally:
        detector.batch_size = 8
    for single, batch in zip(singles, batched):
        assert torch.allclose(single["boxes"], batch["boxes"], atol=1e-3)
        assert torch.allclose(single["scores"], batch["scores"], atol=1e-5)


def test_bad_inputs_are_clear_errors(detector, tmp_path):
    with pytest.raises(ValueError, match=r"images\[0\].*uint8"):
        detector([np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        detector([torch.zeros(3, 8, 8), 12])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        detector(str(tmp_path / "missing.jpg"))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        m2det.Detector(tmp_path / "none.safetensors")
    torch.save({"conf.0.bias": torch.zeros(6)}, tmp_path / "official.pth")
    with pytest.raises(ValueError, match="official.pth: an official checkpoint needs its preset"):
        m2det.Detector(tmp_path / "official.pth")
    with pytest.raises(ValueError, match="unknown post-processing settings"):
        tiny_detector(settings="fastest")
    with pytest.raises(ValueError, match="too small"):
        tiny_detector(sizes=[160])
    with pytest.raises(ValueError, match="device"):
        tiny_detector(device="nonsense")


def test_a_file_that_is_no_model_is_named_with_the_kinds_expected(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("weights: m2det512_vgg.pth\n")
    expected = (
        f"{notes}: not a model file; expected our .safetensors model (from training or `m2det convert`), "
        "an official M2Det .pth checkpoint (with its preset), or an .onnx or OpenVINO .xml file from "
        "`m2det export`"
    )
    for preset in (None, TINY):  # with a preset it is still not "an official checkpoint"
        with pytest.raises(ValueError) as info:
            m2det.Detector(notes, preset=preset)
        assert str(info.value) == expected
    result = CliRunner().invoke(app, ["detect", str(notes), "--weights", str(notes)])
    assert result.exit_code == 2 and " ".join(expected.split()) in " ".join(result.output.split())


def test_random_weights_warn_loudly():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        m2det.Detector(preset=TINY)


def test_detector_loads_our_model_file(tmp_path, bccd_image):
    from m2det.io.checkpoint import save_model

    torch.manual_seed(1)
    model = m2det.build_model(TINY, num_classes=4, class_names=["RBC", "WBC", "Platelets"])
    path = save_model(model, tmp_path / "tiny.safetensors")
    detector = m2det.Detector(path, score_threshold=0.2)
    assert detector.class_names == ["RBC", "WBC", "Platelets"]
    model.eval().set_postprocess(detector.settings)
    image = torch.from_numpy(cv2.imread(str(bccd_image))[..., ::-1].copy()).permute(2, 0, 1)
    with torch.inference_mode():
        expected = model([image])[0]
    got = detector(image)
    assert equal_results(got, expected) and set(got["label_names"]) <= {"RBC", "WBC", "Platelets"}
    with pytest.raises(ValueError, match="holds a m2det_tiny model"):
        m2det.Detector(path, preset="m2det320_vgg16")


# ----- multi-scale and flip -----
def test_one_size_without_flip_equals_the_model_forward(bccd_image):
    torch.manual_seed(2)
    detector = tiny_detector(score_threshold=0.25, sizes=[320])
    model = detector.model
    model.set_postprocess(detector.settings)
    images = [
        torch.from_numpy(cv2.imread(str(bccd_image))[..., ::-1].copy()).permute(2, 0, 1),
        torch.rand(3, 90, 120),
    ]
    with torch.inference_mode():
        expected = model(images)
    for got, want in zip(detector(images), expected):
        assert len(want["boxes"]) > 0 and equal_results(got, want)


def test_mirror_boxes():
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0]])
    assert mirror_boxes(boxes, torch.tensor([100.0])).tolist() == [[70.0, 5.0, 90.0, 25.0]]
    assert torch.equal(mirror_boxes(mirror_boxes(boxes, torch.tensor([100.0])), torch.tensor([100.0])), boxes)


class StripeFinder:
    """A network whose output we control: one confident class-1 box on the first-scale anchor
    (40 x 40 grid at 320, 6 anchors per cell) under the brightest column of the input."""

    def __init__(self, num_anchors: int, num_classes: int):
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.calls = 0

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        n = batch.shape[0]
        logits = torch.zeros(n, self.num_anchors, self.num_classes)
        logits[..., 0] = 10.0
        column = batch.mean(dim=(1, 2)).argmax(dim=-1)  # [n]
        cell = 20 * 40 + column // 8
        logits[torch.arange(n), cell * 6, 1] = 20.0
        return torch.zeros(n, self.num_anchors, 4), logits


def test_flip_maps_the_mirrored_pass_back(bccd_image):
    detector = tiny_detector(settings=PAPER.replace(nms="hard"), sizes=[320])
    anchors = detector.model.anchors(320)
    finder = StripeFinder(anchors.shape[0], detector.model.num_classes)
    detector.model.forward_raw = finder
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    image[:, :, 30:34] = 255  # a bright stripe on the left
    (single,) = detector([image])
    assert finder.calls == 1 and len(single["boxes"]) == 1
    cx = single["boxes"][0, 0::2].mean()
    assert abs(cx - 32) < 5  # the anchor under the stripe

    detector.flip = True
    (merged,) = detector([image])
    assert finder.calls == 3
    # the mirrored pass found the stripe on the right; mapped back, it lands on the same spot and
    # NMS merges the two into one box (unmapped, there would be a second box near x = 168)
    assert len(merged["boxes"]) == 1
    assert torch.allclose(merged["boxes"], single["boxes"], atol=1e-3)

    # with the flipped image, the detection is the mirror of the original one
    detector.flip = False
    (flipped,) = detector([image.flip(-1)])
    assert torch.allclose(flipped["boxes"], mirror_boxes(single["boxes"], torch.tensor([200.0])), atol=1e-3)


def test_several_sizes_each_use_their_own_anchors():
    detector = tiny_detector(settings=PAPER.replace(nms="hard"), sizes=[288, 320])
    seen = []

    def network(batch):
        size = batch.shape[-1]
        seen.append(size)
        anchors = detector.model.anchors(size)
        logits = torch.zeros(batch.shape[0], anchors.shape[0], detector.model.num_classes)
        logits[..., 0] = 10.0
        logits[:, -1, 2 if size == 288 else 3] = 20.0  # the last anchor, a class per size
        return torch.zeros(batch.shape[0], anchors.shape[0], 4), logits

    detector.model.forward_raw = network
    (result,) = detector([torch.zeros(3, 60, 80, dtype=torch.uint8)])
    assert seen == [288, 320]
    assert sorted(result["labels"].tolist()) == [2, 3]
    scale = torch.tensor([80.0, 60.0, 80.0, 60.0])
    for size, label in ((288, 2), (320, 3)):
        cx, cy, w, h = detector.model.anchors(size)[-1].tolist()
        expected = torch.minimum(
            (torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * scale).clamp(min=0), scale
        )
        assert torch.allclose(result["boxes"][result["labels"] == label][0], expected, atol=1e-3)


def overlapping_pair_network(model: m2det.M2Det):
    """`forward_raw` for `model` that finds class 1 on two concentric anchors of the central cell
    (IoU 0.53) scoring 0.9 and 0.5: linear soft-NMS decays the second to 0.5 * (1 - 0.53) = 0.23."""

    def network(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anchors = model.anchors(batch.shape[-1])
        logits = torch.zeros(batch.shape[0], anchors.shape[0], model.num_classes)
        logits[..., 0] = 10.0  # background everywhere ...
        first = (20 * 40 + 20) * 6  # ... but on the first two anchors of the central cell
        logits[:, first : first + 2] = -30.0
        logits[:, first : first + 2, 0] = 0.0
        logits[:, first, 1] = float(np.log(9.0))  # softmax 0.9
        logits[:, first + 1, 1] = 0.0  # softmax 0.5
        return torch.zeros(batch.shape[0], anchors.shape[0], 4), logits

    return network


def test_score_threshold_is_a_floor_after_soft_nms():
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    everything = tiny_detector(settings=PAPER.replace(score_threshold=0.3), sizes=[320])
    everything.model.forward_raw = overlapping_pair_network(everything.model)
    assert everything(image)["scores"].tolist() == pytest.approx([0.9, 0.5 * (1 - 0.5333)], abs=1e-3)
    floored = tiny_detector(score_threshold=0.3, sizes=[320])
    floored.model.forward_raw = overlapping_pair_network(floored.model)
    result = floored(image)
    assert result["scores"].tolist() == pytest.approx([0.9]) and result["labels"].tolist() == [1]
    assert floored.settings.min_score == floored.settings.score_threshold == 0.3


# ----- drawing -----
def test_draw_detections():
    image = torch.full((3, 60, 80), 255, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 40.0], [-5.0, 20.0, 200.0, 59.0]])
    drawn = draw_detections(image, boxes, torch.tensor([1, 2]), torch.tensor([0.87, 0.5]), ["cell", "dot"])
    assert drawn.dtype == torch.uint8 and drawn.shape == image.shape
    assert tuple(drawn[:, 40, 30].tolist()) == class_color(1)  # bottom edge of the first box
    assert tuple(drawn[:, 59, 60].tolist()) == class_color(2)  # clipped box, drawn at the border
    assert class_color(1) != class_color(2) and class_color(3) == class_color(3 + 20)
    assert label_text(1, 0.8712, ["cell", "dot"]) == "cell 0.87" and label_text(7, None, None) == "7"
    assert torch.equal(draw_detections(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)), image)
    with pytest.raises(ValueError, match="2 boxes, 1 labels"):
        draw_detections(image, boxes, torch.tensor([1]))


def test_best_boxes_are_drawn_last_so_their_labels_stay_readable():
    image = torch.full((3, 60, 80), 255, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 40.0]]).repeat(2, 1)
    labels, scores = torch.tensor([1, 2]), torch.tensor([0.9, 0.2])  # best first, as NMS returns them
    names = ["best_of_all", "x"]  # the low box's label is shorter: the best one covers it entirely
    alone = draw_detections(image, boxes[:1], labels[:1], scores[:1], names)
    for order in ([0, 1], [1, 0]):
        drawn = draw_detections(image, boxes[order], labels[order], scores[order], names)
        assert torch.equal(drawn, alone)  # border and label of the best box on top of the low one
    assert tuple(alone[:, 40, 30].tolist()) == class_color(1)


# ----- sources and the command -----
@pytest.fixture
def image_folder(tmp_path, bccd_root):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted((bccd_root / "JPEGImages").glob("*.jpg"))[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_resolve_source(image_folder):
    kinds = {item.name: item.kind for item in resolve_source(image_folder)}
    assert kinds["notes.txt"] == "unsupported" and kinds["broken.jpg"] == "image" and len(kinds) == 5
    assert len(resolve_source(str(image_folder / "Blood*.jpg"))) == 3
    assert resolve_source("0")[0].kind == "camera"
    with pytest.raises(FileNotFoundError, match="source not found"):
        resolve_source(image_folder / "nothing_here.jpg")


def run_detect(*args):
    return CliRunner().invoke(app, ["detect", *map(str, args), "--preset", TINY, "--score", "0.3"])


def test_detect_folder_writes_pictures_and_json(image_folder, tmp_path):
    out = tmp_path / "out"
    result = run_detect(image_folder, "--out", out, "--batch", "2")
    assert result.exit_code == 0, result.output
    assert "skipped 2" in result.output and "broken.jpg" in result.output and "notes.txt" in result.output
    assert "RANDOM weights" in result.output
    report = json.loads((out / "detections.json").read_text())
    coco = json.loads((out / "results_coco.json").read_text())
    assert [image["id"] for image in report["images"]] == [1, 2, 3]
    assert {s["file"].rsplit("/", 1)[-1] for s in report["skipped"]} == {"broken.jpg", "notes.txt"}
    for image in report["images"]:
        name = image["file"].rsplit("/", 1)[-1]
        original = cv2.imread(str(image_folder / name))
        drawn = cv2.imread(str(out / name))
        assert drawn.shape == original.shape == (image["height"], image["width"], 3)
        assert np.abs(drawn.astype(int) - original).max() > 100  # boxes were drawn
        assert image["detections"]
        mine = [c for c in coco if c["image_id"] == image["id"]]
        assert len(mine) == len(image["detections"])
        for entry, det in zip(mine, image["detections"]):
            x1, y1, x2, y2 = det["box"]
            assert entry["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.02)
            assert entry["category_id"] == det["label"] and entry["score"] == det["score"]


@pytest.fixture
def video(tmp_path, bccd_image):
    path = tmp_path / "clip.mp4"
    frame = cv2.resize(cv2.imread(str(bccd_image)), (160, 120))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (160, 120))
    for i in range(5):
        writer.write(np.roll(frame, 8 * i, axis=1))
    writer.release()
    return path


def count_frames(path):
    capture = cv2.VideoCapture(str(path))
    frames = 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    return frames


def test_detect_video_writes_an_annotated_video(video, tmp_path):
    out = tmp_path / "out"
    result = run_detect(video, "--out", out, "--batch", "2")
    assert result.exit_code == 0, result.output
    assert count_frames(out / "clip.mp4") == 5
    report = json.loads((out / "detections.json").read_text())
    assert [image["frame"] for image in report["images"]] == [0, 1, 2, 3, 4]
    assert all(image["width"] == 160 and image["height"] == 120 for image in report["images"])
    assert "5 frames" in result.output

    capped = run_detect(video, "--out", tmp_path / "capped", "--max-frames", "3", "--no-save")
    assert capped.exit_code == 0, capped.output
    assert not (tmp_path / "capped" / "clip.mp4").exists()
    assert len(json.loads((tmp_path / "capped" / "detections.json").read_text())["images"]) == 3


def test_detect_multiscale_options_and_errors(image_folder, tmp_path, monkeypatch):
    image = next(image_folder.glob("Blood*.jpg"))
    result = run_detect(
        image, "--out", tmp_path / "ms", "--sizes", "288,320", "--flip", "--settings", "official"
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ms" / "detections.json").read_text())
    assert report["sizes"] == [288, 320] and report["flip"] and report["settings"]["plus_one"]

    bad = run_detect(image, "--sizes", "288,abc", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "--sizes" in bad.output
    missing = run_detect(tmp_path / "nowhere", "--out", tmp_path / "y")
    assert missing.exit_code == 2 and "source not found" in missing.output
    nothing = run_detect(image_folder / "notes.txt", "--out", tmp_path / "z")
    assert nothing.exit_code == 2 and "nothing could be read" in nothing.output

    monkeypatch.chdir(tmp_path)  # the default output folder is a fresh runs/detect/expN
    assert run_detect(image, "--no-save").exit_code == 0
    assert (tmp_path / "runs" / "detect" / "exp1" / "detections.json").is_file()
    assert next_run_dir(tmp_path / "runs" / "detect") == tmp_path / "runs" / "detect" / "exp2"


# ----- thresholds and writing, on generated images -----
@pytest.fixture
def png_folder(tmp_path):
    folder = tmp_path / "png"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        cv2.imwrite(str(folder / f"{name}.png"), rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    return folder


def invoke_detect(*args):
    return CliRunner().invoke(app, ["detect", *map(str, args), "--preset", TINY])


def read_rgb(path):
    return torch.from_numpy(cv2.imread(str(path))[..., ::-1].copy()).permute(2, 0, 1)


def test_detect_writes_and_draws_only_what_scores_above_the_floor(png_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(m2det.M2Det, "forward_raw", lambda self, batch: overlapping_pair_network(self)(batch))
    image = png_folder / "a.png"
    result = invoke_detect(image, "--out", tmp_path / "out")  # the default --score: 0.3
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "detections.json").read_text())
    (entry,) = report["images"]
    assert [d["score"] for d in entry["detections"]] == [0.9]  # the box decayed to 0.23 is not written
    assert report["settings"]["min_score"] == report["settings"]["score_threshold"] == 0.3
    assert len(json.loads((tmp_path / "out" / "results_coco.json").read_text())) == 1
    assert read_json_lines(tmp_path / "out" / "detections.jsonl") == report["images"]
    # ... nor drawn: the picture is the image with the one box kept
    rgb = read_rgb(image)
    kept = tiny_detector(score_threshold=0.3)(rgb)
    expected = draw_detections(rgb, kept["boxes"], kept["labels"], kept["scores"], report["class_names"])
    assert torch.equal(read_rgb(tmp_path / "out" / "a.png"), expected)

    low = invoke_detect(image, "--out", tmp_path / "low", "--score", "0.2")
    assert low.exit_code == 0, low.output
    (entry,) = json.loads((tmp_path / "low" / "detections.json").read_text())["images"]
    assert [d["score"] for d in entry["detections"]] == pytest.approx([0.9, 0.2333], abs=1e-3)
    assert not torch.equal(read_rgb(tmp_path / "low" / "a.png"), expected)


def error_lines(result):
    return [line for line in result.output.splitlines() if "error" in line.lower()]


def test_detect_out_that_is_a_file_is_one_clear_error(png_folder, tmp_path):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    result = invoke_detect(png_folder / "a.png", "--out", taken)
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {taken}: File exists (a file, where a folder is needed)"]
    below = invoke_detect(png_folder / "a.png", "--out", taken / "run")
    assert below.exit_code == 2
    assert error_lines(below) == [
        f"error: {taken / 'run'}: Not a directory ({taken} is a file, not a folder)"
    ]
    assert "Traceback" not in result.output + below.output


def test_detect_keeps_the_images_done_when_a_picture_cannot_be_written(png_folder, tmp_path):
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)  # a folder where the second picture goes
    result = invoke_detect(png_folder, "--out", out, "--batch", "1", "--score", "0.5")
    assert result.exit_code == 2
    assert error_lines(result) == [
        f"error: {out / 'b.png'}: Is a directory (a folder, where a file is needed)"
    ]
    # a.png was done, b.png detected but not drawn (so not recorded: a resumed run does it again),
    # c.png never reached; no final files
    records = read_json_lines(out / "detections.jsonl")
    assert [os.path.basename(r["file"]) for r in records] == ["a.png"]
    assert (out / "a.png").is_file() and not (out / "c.png").exists()
    assert not (out / "detections.json").exists() and not list(out.glob(".*.tmp"))


class FillsUp:
    """A text file that takes `lines` writes and then fails like a full disk."""

    def __init__(self, file, lines):
        self.file, self.room = file, lines

    def write(self, text):
        if self.room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= 1
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_detect_on_a_full_disk_keeps_the_detections_written(png_folder, tmp_path, monkeypatch):
    def open_filling_up(*args, **kwargs):
        return FillsUp(open(*args, **kwargs), lines=2)  # noqa: SIM115 - the writer closes it

    monkeypatch.setattr(jsonfile, "open", open_filling_up, raising=False)
    out = tmp_path / "out"
    result = invoke_detect(png_folder, "--out", out, "--batch", "1", "--no-save", "--score", "0.5")
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {out / 'detections.jsonl'}: No space left on device"]
    records = read_json_lines(out / "detections.jsonl")
    assert [os.path.basename(r["file"]) for r in records] == ["a.png", "b.png"]
    # numbered only when the run's records are merged at the end
    assert all(set(r) == {"file", "frame", "width", "height", "detections"} for r in records)


def test_read_json_lines_ignores_only_a_last_line_cut_short(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "fi')
    assert read_json_lines(path) == [{"id": 1}, {"id": 2}]
    path.write_text('{"id": 1}\n{"id": 2\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"r.jsonl, line 2: not valid JSON"):
        read_json_lines(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_detect_skips_a_decompression_bomb_by_name(tmp_path, bccd_root):
    from image_helpers import bomb_png

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sorted((bccd_root / "JPEGImages").glob("*.jpg"))[0], folder / "good.jpg")
    (folder / "bomb.png").write_bytes(bomb_png(10000, 10000))
    result = run_detect(folder, "--out", tmp_path / "out", "--no-save")
    assert result.exit_code == 0, result.output
    assert "bomb.png" in result.output and "over the limit of 40 MP" in result.output
    report = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [image["file"].rsplit("/", 1)[-1] for image in report["images"]] == ["good.jpg"]
