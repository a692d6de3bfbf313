"""An advisory lock on a file (`fcntl.flock`), so that two runs never write the same output folder.

The kernel drops the lock when its holder exits, killed or not, so a crash never leaves a stale
lock behind; the file itself stays (it holds the holder's pid, for the error message).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Optional, Union

from m2det.io.atomic import errors_name

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs there are not guarded
    fcntl = None  # type: ignore[assignment]


class LockHeld(RuntimeError):
    """Another process holds the lock; `holder` is its pid as it wrote it (may be empty)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path}: locked by process {holder or '?'}")
        self.path, self.holder = path, holder


class FileLock:
    """An exclusive, non-blocking lock on `path`: `acquire()` raises `LockHeld` when another process
    has it; `release()` (or exiting the process) frees it."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._file: Optional[IO[str]] = None

    def acquire(self) -> FileLock:
        if self._file is not None or fcntl is None:
            return self
        with errors_name(self.path):
            handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise LockHeld(self.path, holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
