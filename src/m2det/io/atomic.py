"""Atomic file writes: a file is replaced whole or not at all, and a failed write's error names it.

Every writer in m2det (model files, training state, JSON, CSV, plots, images, exports) goes through
`atomic_path`, so that a crash or a full disk never leaves a half-written file under a real name.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, Union

# The names `atomic_path` gives its temporaries: `.NAME.` + mkstemp's 8 random characters + `.tmp`.
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@contextmanager
def atomic_path(path: Union[str, Path], durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash or an exception leaves any earlier file at `path` untouched. `durable` also flushes the
    file to the disk before the rename and the folder after it, so that a power cut cannot leave
    the new name on an empty file; a full disk then fails here rather than later. An OSError
    that names no file (a failed write) or the temporary is raised again naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        _raise_naming(exc, path)
    os.close(fd)
    tmp_path = Path(tmp)
    replaced = False
    try:
        # mkstemp makes owner-only files (and so do writers that replace the file, like safetensors');
        # give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
        os.chmod(tmp_path, mode)
        yield tmp_path
        os.chmod(tmp_path, mode)
        if durable:
            _fsync(tmp_path)
        os.replace(tmp_path, path)
        replaced = True
        if durable:
            _fsync(path.parent)
    except OSError as exc:
        _raise_naming(exc, path)
    finally:
        if not replaced:
            tmp_path.unlink(missing_ok=True)


@contextmanager
def errors_name(path: Union[str, Path]) -> Iterator[None]:
    """System errors raised inside name `path` when they name no file (a failed write or flush on a
    full disk) or only a temporary, so that the message says which file could not be written."""
    try:
        yield
    except OSError as exc:
        _raise_naming(exc, Path(path))


def write_bytes_atomic(path: Union[str, Path], data: Union[bytes, memoryview]) -> Path:
    """Write `data` to `path` with `atomic_path(durable=True)`: all of it or, on any error, nothing.

    Writers that serialise to memory and write through here raise a plain OSError (ENOSPC on a
    full disk) naming `path`, where their own file writers raise library errors without a name.
    """
    path = Path(path)
    with atomic_path(path, durable=True) as tmp:
        tmp.write_bytes(data)
    return path


def is_temporary(path: Union[str, os.PathLike[str]]) -> bool:
    """Whether `path` has the name of an `atomic_path` temporary."""
    return _TEMP_NAME.fullmatch(Path(path).name) is not None


def remove_temporaries(folder: Union[str, Path]) -> list[Path]:
    """Delete the `atomic_path` temporaries directly in `folder` (left by a killed process); returns them.

    Only plain files with our temporary name pattern, and nothing in subfolders: run this only
    where no other process is writing at the same time.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if is_temporary(entry) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk (folders only where the system can)."""
    is_dir = path.is_dir()
    if is_dir and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY if is_dir else os.O_RDWR)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (is_dir and exc.errno in (errno.EINVAL, errno.ENOTSUP)):  # folders some systems can't sync
            raise
    finally:
        os.close(fd)


def _raise_naming(exc: OSError, path: Path) -> NoReturn:
    """Raise `exc` again, as the same error naming `path` when it names no file or only a temporary."""
    if isinstance(exc.filename, (str, os.PathLike)) and not is_temporary(exc.filename):
        raise exc
    if exc.errno is None:
        raise OSError(f"{path}: {exc}") from exc
    raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
