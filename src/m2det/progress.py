"""Progress bars that suit both a terminal and a log file."""

from __future__ import annotations

import sys
from typing import Any, Optional

# Redirected to a file, a bar that redraws ten times a second fills the log with carriage returns;
# one update every half minute still shows progress and ETA.
LOG_REFRESH_S = 30.0


def progress_bar(
    *, total: Optional[int], desc: str, unit: str, enabled: bool = True, initial: int = 0
) -> Any:
    """A tqdm bar on stderr: live in a terminal, every LOG_REFRESH_S seconds when stderr is a file."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=interactive,
        mininterval=0.1 if interactive else LOG_REFRESH_S,
    )
