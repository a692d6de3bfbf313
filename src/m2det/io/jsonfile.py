"""JSON files written atomically, with NaN and infinities as null so any JSON reader accepts them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

from m2det.io.torchfile import atomic_path


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
