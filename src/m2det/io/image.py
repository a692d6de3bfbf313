"""Images: the one decoder that training, evaluation, detection, bench and serve use (files, bytes,
PIL images, OpenCV arrays: `read_image`, `decode_image`, `to_rgb_tensor`), and the one PNG writer.

Every image becomes a uint8 RGB tensor `[3, H, W]` by one rule, decoded with Pillow:

- EXIF orientation is applied: the image comes out upright, as phones and photo viewers show it
  (and as labelling tools show it, so boxes are given in that frame). `image_size` gives that
  upright size from the file's header.
- Grayscale (and 1-bit) becomes 3 equal channels; palette and CMYK images are converted to RGB.
- 16-bit pixels keep their high byte (value // 256), as Pillow does for 16-bit RGB and libpng and
  OpenCV do for all 16-bit images; 32-bit float pixels are refused (no agreed 8-bit range).
- Transparency (an alpha channel, a palette with alpha, or a transparent colour) is composited on
  white, `ALPHA_BACKGROUND`, as documents and web pages show transparent images; the colours
  stored under fully transparent pixels are arbitrary and never reach the model.
- Only the first frame of an animated or multi-page file is read.

An image whose header declares more than `MAX_IMAGE_PIXELS` pixels (width x height; 40 MP, a 4K
frame is 8.3 MP) is refused before its pixels are decoded, by every reader here (`read_image`,
`decode_image`, `image_size`): `ImageTooLarge`. A 12 KB PNG can declare 10000 x 10000 pixels and
take gigabytes to decode; a data set names such a file and drops it, `m2det detect` skips it, the
service answers 413. Set the module's `MAX_IMAGE_PIXELS`, or pass `max_pixels=`, for larger ones.

A file or body that cannot be decoded raises an `ImageReadError` naming it and saying what is
wrong: `UnsupportedImage` (not an image Pillow reads, or pixels with no RGB meaning) or
`CorruptImage` (truncated or damaged data). Truncation is found because the pixels are decoded in
full with Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` left False (m2det never sets it).

Why Pillow and not OpenCV: `cv2.imread` decodes a truncated JPEG as a half-grey image with a bare
libjpeg warning that names no file (while `cv2.imdecode` returns None for the same bytes), applies
EXIF orientation to JPEG only, and leaves no control over alpha. Pillow reports truncation as an
error and reads orientation from JPEG, PNG, WebP and TIFF alike. Both use libjpeg-turbo: a
640x480 JPEG decodes to identical pixels, Pillow (this whole rule) taking about 0.3 ms more on
an idle core (2.1 against 1.7 ms; `benchmarks/image_decode.py`), little beside the network.
Video frames are not images in this sense: they stay with `cv2.VideoCapture`.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor

from m2det.errors import M2DetError
from m2det.io.atomic import atomic_path

PathLike = Union[str, Path]

# Image files the data sets and `m2det detect` read, in the order a VOC image id is tried with.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# What transparent pixels are composited on (RGB).
ALPHA_BACKGROUND = (255, 255, 255)

# EXIF orientations that turn the image by 90 degrees, so its upright width is the stored height.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# What Pillow raises on damaged data (its plugins use SyntaxError, struct and index errors too).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
_READABLE = "JPEG, PNG, BMP, TIFF, WebP, PPM/PGM"

# The most pixels (width x height, as the header declares them) an image may have to be decoded;
# read when called, so setting it here changes every reader. Pillow's own bomb check (a warning
# over 89 MP, an error over 179 MP) stays behind it.
MAX_IMAGE_PIXELS = 40_000_000
# The factors a decoder can shrink an image by while decoding (libjpeg's DCT scaling).
REDUCE_FACTORS = (8, 4, 2, 1)


class ImageReadError(M2DetError):
    """An image that cannot be used: `source` names the file (or request body), `problem` says why."""

    def __init__(self, source: object, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class ImageNotFound(ImageReadError, FileNotFoundError):
    """The image file does not exist (also a `FileNotFoundError`)."""


class UnsupportedImage(ImageReadError):
    """Not an image format Pillow reads, or pixels that have no RGB meaning."""


class CorruptImage(ImageReadError):
    """The image's data is truncated or damaged."""


class ImageTooLarge(UnsupportedImage):
    """An image whose header declares more pixels than allowed (`MAX_IMAGE_PIXELS`): refused before
    its pixels are decoded, as decoding a decompression bomb takes gigabytes."""

    def __init__(self, source: object, width: int, height: int, limit: int) -> None:
        self.width, self.height, self.limit = width, height, limit
        size = f"{width}x{height} pixels ({width * height / 1e6:.1f} MP)" if width else "its size"
        super().__init__(
            source, f"{size} is over the limit of {limit / 1e6:g} MP (m2det.io.image.MAX_IMAGE_PIXELS)"
        )


def check_pixels(width: int, height: int, source: object, max_pixels: Optional[int] = None) -> None:
    """Raise `ImageTooLarge` when `width` x `height` is over `max_pixels` (None: `MAX_IMAGE_PIXELS`)."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    if width * height > limit:
        raise ImageTooLarge(source, width, height, limit)


def reduce_factor(width: int, height: int, min_side: int) -> int:
    """The largest of 8, 4, 2, 1 that the image can be shrunk by while keeping both sides at least
    `min_side` pixels: what `read_image`/`decode_image` may decode at (`reduce=`) when only an image
    of about `min_side` pixels is needed (a network input), instead of the full size."""
    return next(k for k in REDUCE_FACTORS if k == 1 or min(width, height) >= k * min_side)


def read_image(path: PathLike, *, max_pixels: Optional[int] = None, reduce: int = 1) -> Tensor:
    """An image file as uint8 RGB `[3, H, W]`, upright, by the module's rule; `ImageReadError` naming it.

    `max_pixels`: the most pixels its header may declare (None: `MAX_IMAGE_PIXELS`). `reduce`: 2, 4
    or 8 decodes it at that fraction of its size (ceil(W / reduce) x ceil(H / reduce)): a JPEG by
    libjpeg's scaled decoding, without the full-size pixels ever in memory; others are decoded,
    then shrunk (box filter) before the RGB tensor is made.
    """
    path = _existing(path)
    with _open(path, path, max_pixels) as image:
        return to_rgb(image, path, reduce=reduce)


def decode_image(
    data: bytes, source: str = "image bytes", *, max_pixels: Optional[int] = None, reduce: int = 1
) -> Tensor:
    """Encoded image bytes (a file's content) as uint8 RGB `[3, H, W]`, by the same rule as `read_image`.

    `source` names the bytes in errors (e.g. "request body"); `max_pixels` and `reduce` as for
    `read_image`.
    """
    if not data:
        raise UnsupportedImage(source, "empty: no image data")
    with _open(io.BytesIO(data), source, max_pixels) as image:
        return to_rgb(image, source, reduce=reduce)


def to_rgb(
    image: Image.Image, source: object = "image", *, max_pixels: Optional[int] = None, reduce: int = 1
) -> Tensor:
    """An opened Pillow image as uint8 RGB `[3, H, W]` by the module's rule (`image` is not changed).

    The pixels are decoded here, so truncated or damaged data raises `CorruptImage` naming `source`;
    `max_pixels` and `reduce` as for `read_image`.
    """
    if reduce not in REDUCE_FACTORS:
        raise ValueError(f"reduce must be one of {REDUCE_FACTORS}, got {reduce}")
    check_pixels(*image.size, source, max_pixels)
    stored = image.size
    try:
        if reduce > 1 and image.format == "JPEG":
            image.draft(image.mode, (stored[0] // reduce, stored[1] // reduce))
        image.load()
        if _orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise UnsupportedImage(source, f"too large to decode ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise CorruptImage(source, f"truncated or damaged image data ({exc})") from None
    if image.mode == "F":
        raise UnsupportedImage(
            source, "32-bit float pixels have no agreed 8-bit range; save it as 8 or 16 bit"
        )
    if image.mode in _SIXTEEN_BIT_MODES:
        high_byte = np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8
        image = Image.fromarray(high_byte.astype(np.uint8), "L")
    try:
        if image.has_transparency_data:
            background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        if image.mode != "RGB":
            image = image.convert("RGB")
    except ValueError as exc:
        raise UnsupportedImage(source, f"{image.mode} pixels cannot be converted to RGB ({exc})") from None
    if reduce > 1:  # what the JPEG decoder did not shrink already
        wanted = -(-max(stored) // reduce)
        if max(image.size) > wanted:
            image = image.reduce(max(1, round(max(image.size) / wanted)))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def to_rgb_tensor(image: Union[PathLike, np.ndarray, Tensor, Image.Image], where: str = "image") -> Tensor:
    """A path, PIL image, OpenCV-style numpy array (BGR HWC uint8) or CHW tensor -> RGB CHW tensor.

    Files and PIL images follow this module's rule (EXIF orientation applied, alpha composited on
    white, ...), as training and evaluation read them; arrays and tensors are taken as they are."""
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"{where}: expected a CHW tensor with 1 or 3 channels, got {tuple(image.shape)}")
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(
                f"{where}: expected a uint8 array (BGR HWC, as cv2.imread gives), got {image.dtype}"
            )
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"{where}: expected an HWC array with 1, 3 or 4 channels, got shape {image.shape}"
            )
        rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., 2::-1]  # BGR(A) -> RGB
        return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    if isinstance(image, Image.Image):
        return to_rgb(image, where)
    raise ValueError(
        f"{where}: expected a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}"
    )


def write_png(path: PathLike, rgb: Tensor) -> Path:
    """Write a uint8 RGB `[3, H, W]` tensor as a PNG file, atomically (the one image writer)."""
    path = Path(path)
    pixels = Image.fromarray(rgb.detach().cpu().permute(1, 2, 0).contiguous().numpy(), "RGB")
    with atomic_path(path) as tmp:
        pixels.save(tmp, format="PNG")
    return path


def image_size(
    path: Union[PathLike, bytes], *, max_pixels: Optional[int] = None, source: Optional[str] = None
) -> tuple[int, int]:
    """(width, height) of the image `read_image` (a path) or `decode_image` (bytes) returns (EXIF
    orientation applied), from the header; `ImageTooLarge` when it declares more than `max_pixels`
    (None: `MAX_IMAGE_PIXELS`), so a data set's header check drops a decompression bomb by name.

    The pixels are not decoded, so a truncated file is only found by `read_image`. A PNG whose EXIF
    block follows its pixel data (rare) is taken as unrotated here, as finding it means decoding.
    `source` names bytes in errors.
    """
    opened: Union[Path, io.BytesIO]
    if isinstance(path, bytes):
        name: object = source or "image bytes"
        if not path:
            raise UnsupportedImage(name, "empty: no image data")
        opened = io.BytesIO(path)
    else:
        opened = name = _existing(path)
    with _open(opened, name, max_pixels) as image:
        width, height = image.size
        orientation = _header_orientation(image, name)
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


def exif_orientation(path: PathLike) -> int:
    """The EXIF orientation of an image file, 1..8 (1: upright as stored, also when absent or
    invalid), from its header."""
    path = _existing(path)
    with _open(path, path) as image:
        return _header_orientation(image, path)


def _orientation(image: Image.Image, decode: bool = True) -> int:
    """The EXIF orientation of an opened image (1 when absent or invalid); `decode=False` looks only
    at what the header holds (Pillow decodes a PNG to look for EXIF after its pixels)."""
    if not decode and image.format == "PNG" and "exif" not in image.info:
        return 1
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _header_orientation(image: Image.Image, source: object) -> int:
    try:
        return _orientation(image, decode=False)
    except _DECODE_ERRORS as exc:
        raise CorruptImage(source, f"damaged image header ({exc})") from None


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ImageNotFound(path, "image file not found")
    return path


def _open(file: Union[Path, io.BytesIO], source: object, max_pixels: Optional[int] = None) -> Image.Image:
    """`Image.open` (the header only) with its failures as `ImageReadError` naming `source`, and
    `ImageTooLarge` for more than `max_pixels` (None: `MAX_IMAGE_PIXELS`)."""
    try:
        image = Image.open(file)
    except Image.UnidentifiedImageError:
        raise UnsupportedImage(
            source, f"not an image file Pillow can read (expected {_READABLE}, ...)"
        ) from None
    except Image.DecompressionBombError:  # Pillow's own check, over 2 x Image.MAX_IMAGE_PIXELS
        limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
        raise ImageTooLarge(source, 0, 0, min(limit, 2 * (Image.MAX_IMAGE_PIXELS or 0))) from None
    except OSError as exc:  # the file itself: a folder, no permission, ...
        raise ImageReadError(source, f"cannot be opened ({exc.strerror or exc})") from None
    except _DECODE_ERRORS as exc:
        raise CorruptImage(source, f"damaged image header ({exc})") from None
    try:
        check_pixels(*image.size, source, max_pixels)
    except ImageTooLarge:
        image.close()
        raise
    return image
