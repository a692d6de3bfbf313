"""One image reader everywhere: the decoding rule, and data sets, detection and `m2det detect`
agreeing on it (phone photos upright, damaged files named and skipped)."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import m2det
from image_helpers import (
    jpeg_bytes,
    save_oriented,
    truncated_jpeg_bytes,
    upright_scene,
)
from m2det.cli.main import app
from m2det.data import DatasetError, build_dataset
from m2det.engine.evaluate import evaluate
from m2det.io.image import (
    ALPHA_BACKGROUND,
    CorruptImage,
    ImageReadError,
    UnsupportedImage,
    decode_image,
    image_size,
    read_image,
    to_rgb_tensor,
)

TINY = "m2det_tiny"


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def hwc(tensor: torch.Tensor) -> np.ndarray:
    assert tensor.dtype == torch.uint8 and tensor.dim() == 3 and tensor.shape[0] == 3
    return tensor.permute(1, 2, 0).numpy()


# ----- the rule -----
@pytest.fixture
def colours() -> np.ndarray:
    """A 16x24 RGB picture of six flat 8x8 blocks (flat, so JPEG keeps them nearly exact)."""
    palette = np.array(
        [[0, 0, 0], [255, 255, 255], [200, 30, 40], [20, 180, 60], [30, 60, 210], [128, 128, 0]]
    )
    blocks = np.arange(6).reshape(2, 3).repeat(8, axis=0).repeat(8, axis=1)
    return palette[blocks].astype(np.uint8)


def test_every_colour_layout_decodes_to_rgb_uint8(colours):
    gray = colours.mean(axis=2).astype(np.uint8)
    expected_gray = np.repeat(gray[..., None], 3, axis=2)
    low_bits = np.random.default_rng(0).integers(0, 256, gray.shape)
    gray16 = (gray.astype(np.uint16) << 8) | low_bits.astype(np.uint16)
    ok, rgb16 = cv2.imencode(".png", (colours.astype(np.uint16) << 8 | 0xAB)[..., ::-1])
    assert ok
    indices = np.arange(6).reshape(2, 3).repeat(8, axis=0).repeat(8, axis=1).astype(np.uint8)
    palette_image = Image.fromarray(indices, "P")
    palette_image.putpalette(colours[::8, ::8].reshape(-1).tolist())
    cases = {
        "grayscale PNG": (encode(Image.fromarray(gray, "L"), "PNG"), expected_gray, 0),
        "16-bit grayscale PNG": (encode(Image.fromarray(gray16), "PNG"), expected_gray, 0),
        "16-bit RGB PNG": (rgb16.tobytes(), colours, 0),
        "palette PNG": (encode(palette_image, "PNG"), colours, 0),
        "opaque RGBA PNG": (encode(Image.fromarray(colours).convert("RGBA"), "PNG"), colours, 0),
        "CMYK JPEG": (encode(Image.fromarray(colours).convert("CMYK"), "JPEG", quality=95), colours, 6),
        "BMP": (encode(Image.fromarray(colours), "BMP"), colours, 0),
    }
    for name, (data, expected, tolerance) in cases.items():
        decoded = hwc(decode_image(data, name))
        assert decoded.shape == expected.shape, name
        difference = np.abs(decoded.astype(int) - expected).max()
        assert difference <= tolerance, f"{name}: off by {difference}"


def test_transparency_is_composited_on_white(colours):
    alpha = np.zeros(colours.shape[:2], np.uint8)
    alpha[:, 8:16] = 255  # the middle column of blocks opaque
    alpha[:, 16:] = 128  # the right one half transparent
    rgba = np.dstack([colours, alpha])
    decoded = hwc(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), "rgba.png")).astype(int)
    white = np.array(ALPHA_BACKGROUND)
    assert (decoded[:, :8] == white).all()  # stored colours under transparent pixels never show
    assert (decoded[:, 8:16] == colours[:, 8:16]).all()
    half = (colours[:, 16:].astype(int) * 128 + white * 127) / 255
    assert np.abs(decoded[:, 16:] - half).max() <= 1
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 100, 50])
    decoded = hwc(decode_image(encode(palette, "PNG", transparency=0), "p.png"))
    assert decoded.tolist() == [[list(ALPHA_BACKGROUND), [200, 100, 50]]]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_sized_from_the_header(tmp_path, orientation):
    upright, _ = upright_scene()
    path = save_oriented(tmp_path / "photo.png", upright, orientation, format="PNG")
    with Image.open(path) as stored:
        turned = orientation in (5, 6, 7, 8)
        assert stored.size == ((64, 48) if turned else (48, 64))  # the file really holds it turned
    assert (hwc(read_image(path)) == upright).all()
    assert image_size(path) == (48, 64)


def test_damaged_and_foreign_files_raise_errors_naming_them(tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(truncated_jpeg_bytes())
    with pytest.raises(CorruptImage, match=r"cut\.jpg: truncated or damaged image data"):
        read_image(cut)
    with pytest.raises(CorruptImage, match=r"^upload: truncated"):
        decode_image(cut.read_bytes(), "upload")
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(UnsupportedImage, match=r"notes\.jpg: not an image file"):
        read_image(text)
    with pytest.raises(FileNotFoundError, match=r"missing\.png: image file not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(UnsupportedImage, match="float"):
        decode_image(encode(Image.new("F", (4, 4), 0.5), "TIFF"), "float.tif")
    with pytest.raises(ImageReadError, match="empty"):
        decode_image(b"", "body")


# ----- data sets and detection agree on phone photos -----
def write_coco(root: Path, images: dict[str, tuple[int, int, list[list[float]]]]) -> Path:
    """A COCO json beside `images/`: file name -> (width, height, boxes xyxy), one class."""
    entries, annotations = [], []
    for image_id, (name, (width, height, boxes)) in enumerate(images.items(), start=1):
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for x1, y1, x2, y2 in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                }
            )
    path = root / "annotations.json"
    data = {"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": "block"}]}
    path.write_text(json.dumps(data))
    return path


def tiny_detector() -> m2det.Detector:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: only the pixels it sees matter here
        return m2det.Detector(preset=TINY, score_threshold=0.3)


def test_phone_photo_is_trained_and_detected_upright(tmp_path):
    upright, box = upright_scene()  # 48 wide, 64 high, as the phone shows it
    (tmp_path / "images").mkdir()
    photo = save_oriented(tmp_path / "images" / "phone.jpg", upright, 6)
    dataset = build_dataset(write_coco(tmp_path, {"phone.jpg": (48, 64, [box])}))
    assert not dataset.report.issues
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 64, 48)
    assert target["boxes"].tolist() == [box]
    x1, y1, x2, y2 = (int(v) for v in box)
    inside = hwc(image)[y1:y2, x1:x2].astype(int).mean(axis=(0, 1))
    assert inside[0] > 180 and inside[1] < 60  # the box sits on the red block
    # the Detector on the path sees the very pixels the data set trains on
    assert torch.equal(to_rgb_tensor(photo), image.as_subclass(torch.Tensor))
    assert torch.equal(to_rgb_tensor(Image.open(photo)), image.as_subclass(torch.Tensor))
    detector = tiny_detector()
    from_path, from_dataset = detector([photo, image.as_subclass(torch.Tensor)])
    assert len(from_path["boxes"]) > 0
    assert torch.equal(from_path["boxes"], from_dataset["boxes"])
    assert (from_path["boxes"][:, 0::2] <= 48).all() and (from_path["boxes"][:, 1::2] <= 64).all()


def test_yolo_sizes_phone_photos_upright(tmp_path):
    upright, (x1, y1, x2, y2) = upright_scene()
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    save_oriented(tmp_path / "images" / "phone.jpg", upright, 6)
    cx, cy, w, h = (x1 + x2) / 2 / 48, (y1 + y2) / 2 / 64, (x2 - x1) / 48, (y2 - y1) / 64
    (tmp_path / "labels" / "phone.txt").write_text(f"0 {cx} {cy} {w} {h}\n")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [block]\n")
    dataset = build_dataset(tmp_path / "data.yaml")
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 64, 48) and target["orig_size"].tolist() == [64, 48]
    assert target["boxes"][0].tolist() == pytest.approx([x1, y1, x2, y2], abs=1e-4)


def test_annotation_in_the_stored_frame_is_named_with_the_reason(tmp_path, caplog):
    upright, _ = upright_scene()
    (tmp_path / "images").mkdir()
    save_oriented(tmp_path / "images" / "phone.jpg", upright, 6)
    Image.fromarray(upright).save(tmp_path / "images" / "plain.jpg")
    # a tool that ignored the orientation recorded the stored 64x48
    path = write_coco(tmp_path, {"phone.jpg": (64, 48, []), "plain.jpg": (48, 64, [])})
    dataset = build_dataset(path)
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        _, target = dataset[0]
    assert target["image_id"] == 2
    (issue,) = dataset.report.issues
    assert issue.where.endswith("phone.jpg") and issue.action == "image dropped"
    assert "48x64 but its annotation says 64x48" in issue.problem and "EXIF orientation 6" in issue.problem
    assert any("phone.jpg" in r.getMessage() and "EXIF" in r.getMessage() for r in caplog.records)


# ----- damaged files: named, skipped -----
@pytest.fixture
def set_with_a_cut_image(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    for name, value in (("a.jpg", 60), ("c.jpg", 200)):
        Image.new("RGB", (64, 48), (value, value, value)).save(tmp_path / "images" / name)
    (tmp_path / "images" / "b.jpg").write_bytes(truncated_jpeg_bytes(64, 48))
    box = [[8.0, 8.0, 40.0, 30.0]]
    return write_coco(tmp_path, {name: (64, 48, box) for name in ("a.jpg", "b.jpg", "c.jpg")})


def test_data_set_reports_and_skips_a_truncated_image(set_with_a_cut_image, caplog):
    dataset = build_dataset(set_with_a_cut_image)
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        image, target = dataset[1]
    assert target["image_id"] == 3 and int(image[0, 0, 0]) > 150  # c.jpg stands in for b.jpg
    (issue,) = dataset.report.issues
    assert issue.where.endswith("b.jpg") and "truncated" in issue.problem and issue.action == "image dropped"
    (record,) = [r for r in caplog.records if "b.jpg" in r.getMessage()]
    assert "truncated" in record.getMessage() and "next image" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        assert dataset[1][1]["image_id"] == 3  # known now: skipped without a second report
    assert not caplog.records and len(dataset.report.issues) == 1
    strict = build_dataset(set_with_a_cut_image, strict=True)
    with pytest.raises(DatasetError, match=r"b\.jpg: truncated"):
        strict[1]


def test_unreadable_images_are_named_and_dropped_before_any_is_loaded(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), (60, 60, 60)).save(tmp_path / "images" / "a.jpg")
    (tmp_path / "images" / "cut.jpg").write_bytes(truncated_jpeg_bytes(64, 48))  # header intact
    (tmp_path / "images" / "notes.jpg").write_text("shopping list\n")  # not an image at all
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "stub.jpg").write_bytes(jpeg_bytes(np.zeros((48, 64, 3), np.uint8))[:20])
    names = ("a.jpg", "cut.jpg", "notes.jpg", "empty.png", "stub.jpg")
    path = write_coco(tmp_path, {name: (64, 48, [[8.0, 8.0, 40.0, 30.0]]) for name in names})
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        dataset = build_dataset(path)
    assert [r.info.path.name for r in dataset.records] == ["a.jpg", "cut.jpg"]
    dropped = {Path(i.where).name: i.problem for i in dataset.report.issues if i.action == "image dropped"}
    assert set(dropped) == {"notes.jpg", "empty.png", "stub.jpg"}
    assert "not an image file" in dropped["notes.jpg"] and "not an image file" in dropped["empty.png"]
    (summary,) = caplog.records  # one warning when the set is built, naming each file
    assert summary.getMessage().splitlines()[0].endswith("3 problem(s) in the data: 3 image dropped")
    assert all(name in summary.getMessage() for name in dropped)
    # the truncated file's header is sound: it is found, as before, when its pixels are decoded
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2det.data"):
        assert dataset[1][1]["image_id"] == 1  # a.jpg stands in for cut.jpg
    assert len(caplog.records) == 1 and "cut.jpg" in caplog.records[0].getMessage()
    with pytest.raises(DatasetError, match=r"notes\.jpg: not an image file"):
        build_dataset(path, strict=True)


def test_evaluation_leaves_out_a_truncated_image(set_with_a_cut_image):
    torch.manual_seed(0)
    model = m2det.build_model(TINY, num_classes=2, class_names=["block"])

    def run(path: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return evaluate(model, build_dataset(path, keep_ignored=True), batch_size=3, progress=False)

    result = run(set_with_a_cut_image)
    # the same as a set without b.jpg: a.jpg and c.jpg scored once each (c.jpg stood in for b.jpg)
    data = json.loads(set_with_a_cut_image.read_text())
    data["images"] = [i for i in data["images"] if i["file_name"] != "b.jpg"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]
    without = set_with_a_cut_image.with_name("without_b.json")
    without.write_text(json.dumps(data))
    expected = run(without)
    assert result.num_images == expected.num_images == 2
    assert len(expected.detections_coco) > 0
    assert result.detections_coco == expected.detections_coco
    assert result.to_json()["metrics"] == expected.to_json()["metrics"]


def test_detect_names_skips_and_counts_a_truncated_image(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    upright, _ = upright_scene()
    (folder / "a_good.jpg").write_bytes(jpeg_bytes(upright))
    (folder / "b_cut.jpg").write_bytes(truncated_jpeg_bytes())
    save_oriented(folder / "c_phone.jpg", upright, 6)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["detect", str(folder), "--preset", TINY, "--score", "0.3", "--out", str(out), "--batch", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "b_cut.jpg" in result.output and "truncated" in result.output
    assert "skipped 1:" in result.output
    report = json.loads((out / "detections.json").read_text())
    assert [Path(i["file"]).name for i in report["images"]] == ["a_good.jpg", "c_phone.jpg"]
    assert all((i["width"], i["height"]) == (48, 64) for i in report["images"])  # the phone photo upright
    (skipped,) = report["skipped"]
    assert Path(skipped["file"]).name == "b_cut.jpg" and "truncated" in skipped["reason"]
    assert cv2.imread(str(out / "c_phone.jpg")).shape == (64, 48, 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    from image_helpers import bomb_png
    from m2det.data.base import MalformedAnnotation
    from m2det.data.base import image_size as dataset_image_size
    from m2det.io.image import ImageTooLarge, decode_image, image_size, read_image

    bomb = bomb_png(10000, 10000)
    assert len(bomb) < 2000
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    for read in (lambda: decode_image(bomb, "body"), lambda: read_image(path), lambda: image_size(path)):
        with pytest.raises(ImageTooLarge, match="10000x10000 pixels .* over the limit of 40 MP"):
            read()
    assert image_size(bomb, max_pixels=10**8) == (10000, 10000)  # the limit is the caller's to raise
    # a data set's header check names the file and drops it, before any epoch decodes it
    with pytest.raises(MalformedAnnotation, match="bomb.png: 10000x10000 pixels"):
        dataset_image_size(path)


def test_reduced_decode_keeps_the_shape_of_the_image(tmp_path):
    from m2det.io.image import decode_image, image_size, reduce_factor

    pixels = np.random.default_rng(0).integers(0, 255, (600, 1000, 3), dtype=np.uint8)
    for suffix in (".jpg", ".png"):
        ok, data = cv2.imencode(suffix, pixels)
        assert image_size(data.tobytes()) == (1000, 600)
        assert reduce_factor(1000, 600, 150) == 4 and reduce_factor(1000, 600, 320) == 1
        image = decode_image(data.tobytes(), reduce=4)
        assert tuple(image.shape) == (3, 150, 250)
        full = decode_image(data.tobytes()).float()
        box_mean = full.reshape(3, 150, 4, 250, 4).mean((2, 4))
        assert (image.float() - box_mean).abs().mean() < 12  # the same picture, smaller
