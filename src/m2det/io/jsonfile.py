"""JSON files: read with errors that name the file; written atomically, NaN and infinities as null."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

from m2det.errors import FileFormatError, M2DetError
from m2det.io.atomic import atomic_path, errors_name


def read_json(path: Union[str, Path], what: str = "file", error: type[M2DetError] = FileFormatError) -> Any:
    """The parsed content of `path`; a missing file or invalid JSON raises `error` (a user mistake,
    `m2det.errors`) naming the file (`what` says which file it was meant to be)."""
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


class JsonLinesWriter:
    """Writes one JSON record per line, each flushed at once, so that the records written so far
    survive a crash or a full disk; errors of the file system name the file."""

    def __init__(self, path: Union[str, Path], append: bool = False):
        self.path = Path(path)
        with errors_name(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # kept open across writes; close() closes it
            self._file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: Any) -> None:
        with errors_name(self.path):
            self._file.write(json.dumps(finite_json(record)) + "\n")
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            with errors_name(self.path):
                self._file.close()

    def __enter__(self) -> JsonLinesWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def trim_torn_tail(path: Union[str, Path]) -> None:
    """Cut a JSON Lines file back to its last complete line: a writer stopped mid-line (killed)
    leaves a line without its newline, which appending would glue to the next record."""
    path = Path(path)
    with errors_name(path), open(path, "rb+") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        end, block = size, 1 << 16
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            end = start
        f.truncate(0)


def read_json_lines(path: Union[str, Path]) -> list[Any]:
    """The records of a JSON Lines file. A last line cut short (no newline: the writer was stopped
    mid-line) is left out; any other line that is not JSON raises FileFormatError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: JSON Lines file not found")
    records = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # unterminated: the write was cut short
                break
            raise FileFormatError(f"{path}, line {number}: not valid JSON ({exc})") from None
    return records
