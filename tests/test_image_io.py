"""One image reader everywhere: the decoding rule, and data sets, detection and `m2det detect`
agreeing on it (phone photos upright, damaged files named and skipped)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from image_helpers import (
    save_oriented,
    truncated_jpeg_bytes,
    upright_scene,
)
from m2det.io.image import (
    ALPHA_BACKGROUND,
    CorruptImage,
    ImageReadError,
    UnsupportedImage,
    decode_image,
    image_size,
    read_image,
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
