"""Progress bars that suit both a terminal and a log file, and the package's log lines on the terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

# Redirected to a file, a bar that redraws ten times a second fills the log with carriage returns;
# one update every half minute still shows progress and ETA.
LOG_REFRESH_S = 30.0

LOGGER_NAME = "m2det"  # the parent of every logger of the package (m2det.train, m2det.demo)


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


class _TerminalHandler(logging.Handler):
    """Each record as one plain line on stdout, written through tqdm so that a live progress bar is
    cleared first and redrawn below the line instead of being broken by it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            # sys.stdout looked up now, not when the handler was made: it may have been replaced since
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def show_logs(quiet: bool = False) -> logging.Handler:
    """Show the package's log messages (the `m2det` logger and its children: training epochs, the
    demo's steps) as plain lines on the terminal, as a command prints them; with `quiet`, warnings
    only. For the command line and scripts; a library user configures `logging` as they like.
    Calling it again changes the level of the one handler instead of adding another."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    handler = next((h for h in logger.handlers if isinstance(h, _TerminalHandler)), None)
    if handler is None:
        handler = _TerminalHandler()
        logger.addHandler(handler)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    return handler
