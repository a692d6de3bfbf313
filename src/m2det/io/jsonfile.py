"""JSON files: read with errors that name the file; written atomically, NaN and infinities as null."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

from m2det.io.torchfile import atomic_path


def read_json(path: Union[str, Path], what: str = "file", error: type[Exception] = ValueError) -> Any:
    """The parsed content of `path`; a missing file or invalid JSON raises `error` naming the file
    (`what` says which file it was meant to be)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def finite_json(value: Any) -> Any:
    """NaN/inf -> None, recursively through dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path: Union[str, Path], data: Any, indent: Optional[int] = None) -> Path:
    """Write `data` to `path` as standard JSON (non-finite numbers as null), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite_json(data), indent=indent))
    return path
