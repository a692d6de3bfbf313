"""Progress bars: live in a terminal, sparse in a log file."""

from __future__ import annotations

import io
import sys
import time

from m2det.progress import LOG_REFRESH_S, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_refreshes_rarely_when_stderr_is_a_file(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(total=5, desc="train", unit="step") as bar:
        for _ in range(5):
            time.sleep(0.15)  # longer than a terminal's refresh interval
            bar.update()
        assert bar.mininterval == LOG_REFRESH_S
    # the opening and the closing state, not one redraw per update
    assert sys.stderr.getvalue().count("\r") == 2


def test_bar_is_live_in_a_terminal_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    with progress_bar(total=10, desc="eval", unit="img", initial=4) as bar:
        assert bar.mininterval < 1 and bar.n == 4
    shown = sys.stderr.getvalue()
    assert "eval:  40%" in shown
    with progress_bar(total=10, desc="eval", unit="img", enabled=False) as bar:
        bar.update(3)
    assert sys.stderr.getvalue() == shown  # the disabled bar wrote nothing
