"""Running a command in its own process with its output in a log file: how a long job (a training)
is kept apart from the program that drives several of them, so that its crash or its memory ends
with it."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

TIMED_OUT = -9  # the exit code `run_logged` reports for a command it killed at its timeout


def run_logged(
    command: Sequence[str],
    log: Union[str, Path],
    *,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[Union[str, Path]] = None,
    timeout: Optional[float] = None,
    append: bool = False,
) -> tuple[int, float]:
    """Run `command` with stdout and stderr in `log` (after a `$ command` line; `append` keeps what
    the file held); returns (exit code, wall seconds). A command still running after `timeout`
    seconds is killed and reported as `TIMED_OUT`."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a" if append else "w") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        try:
            code = subprocess.run(
                list(command), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nkilled after {timeout:.0f} s\n")
            code = TIMED_OUT
    return code, time.perf_counter() - start


def log_tail(log: Union[str, Path], lines: int = 8) -> str:
    """The last `lines` lines of a log file ("" when it cannot be read): what an error report quotes."""
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
