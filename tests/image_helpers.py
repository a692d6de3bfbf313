"""Image files the reading tests need, made on the spot: phone-style rotated JPEGs, truncated JPEGs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112

# The transpose that turns an upright picture into what a camera stores under each EXIF
# orientation (the inverse of what a viewer applies to show it upright).
STORED_FROM_UPRIGHT = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # the viewer turns it back by 90 degrees clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_scene(width: int = 48, height: int = 64) -> tuple[np.ndarray, list[float]]:
    """A portrait picture (grey, a red block in the upper left) and the block's box, xyxy."""
    pixels = np.full((height, width, 3), 128, np.uint8)
    box = [8.0, 8.0, 24.0, 32.0]
    pixels[8:32, 8:24] = (220, 20, 20)
    return pixels, box


def save_oriented(path: Path, upright: np.ndarray, orientation: int, format: str = "JPEG") -> Path:
    """Store `upright` as a camera does under EXIF `orientation`: pixels turned, the tag set."""
    image = Image.fromarray(upright)
    if STORED_FROM_UPRIGHT[orientation] is not None:
        image = image.transpose(STORED_FROM_UPRIGHT[orientation])
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    options = {"quality": 95} if format == "JPEG" else {}
    image.save(path, format, exif=exif.tobytes(), **options)
    return path


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def truncated_jpeg_bytes(width: int = 64, height: int = 48) -> bytes:
    """A noisy JPEG cut in the middle of its pixel data, as an interrupted copy or download leaves it."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = jpeg_bytes(pixels)
    return data[: len(data) // 2]


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` RGB pixels, with only its first rows' data:
    a few hundred bytes that would take width * height * 3 bytes to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width * 3 + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
