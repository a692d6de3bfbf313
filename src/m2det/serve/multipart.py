"""The file in a `multipart/form-data` body (`curl -F file=@street.jpg`), from the body in memory.

The body has already been read under the service's byte limit, so a small parser over bytes does;
python-multipart, which FastAPI's own form parsing needs, is not a dependency of m2det.
"""

from __future__ import annotations

from typing import Optional

# the form fields taken as the image, in this order; else the first part with a file name
FIELD_NAMES = ("file", "image")


class MultipartError(ValueError):
    """A multipart body that holds no usable file part: the message says what to send."""


def boundary_of(content_type: str) -> Optional[str]:
    """The boundary of a `multipart/form-data` content type; None for any other content type."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and value:
            return value.strip().strip('"')
    raise MultipartError("multipart/form-data without a boundary parameter")


def _disposition(headers: bytes) -> dict[str, str]:
    params: dict[str, str] = {}
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() != b"content-disposition":
            continue
        for item in value.decode("utf-8", "replace").split(";")[1:]:
            key, _, val = item.strip().partition("=")
            params[key.strip().lower()] = val.strip().strip('"')
    return params


def multipart_file(body: bytes, boundary: str) -> bytes:
    """The bytes of the image part: the field named `file` (or `image`), else the first part that
    carries a file name; `MultipartError` when there is none."""
    delimiter = b"--" + boundary.encode("latin-1")
    pieces = body.split(delimiter)
    if len(pieces) < 3:
        raise MultipartError("multipart body without its boundary delimiters")
    parts: list[tuple[dict[str, str], bytes]] = []
    for piece in pieces[1:-1]:  # before the first delimiter: preamble; after the last: "--" epilogue
        if piece.startswith(b"\r\n"):
            piece = piece[2:]
        headers, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            raise MultipartError("a multipart part without a blank line after its headers")
        parts.append((_disposition(headers), content[:-2] if content.endswith(b"\r\n") else content))
    for name in FIELD_NAMES:
        for params, content in parts:
            if params.get("name") == name:
                return content
    for params, content in parts:
        if "filename" in params:
            return content
    raise MultipartError(
        "the multipart form has no file: send the image as the field 'file' (curl -F file=@image.jpg)"
    )
