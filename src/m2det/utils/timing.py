"""Wall-clock timing of repeated runs: one stopwatch (CUDA-synchronised) and one summary of its runs.

`torch.utils.benchmark.Timer` runs one statement at a time and its `Measurement` exposes the median
and the IQR but not the quartiles, minimum and maximum our results report; the stopwatch here also
interleaves several callables per round so that a change in the machine's load hits them alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass
class Timing:
    """Wall-clock times of repeated runs, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    max_ms: float
    runs: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        """The summary of `seconds`; quartiles interpolate linearly, as `torch.utils.benchmark` does."""
        ms = torch.tensor(seconds, dtype=torch.float64) * 1e3
        p25, median, p75 = ms.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
        return cls(median, p25, p75, ms.min().item(), ms.max().item(), len(seconds))


class Stopwatch:
    """Times a callable, synchronising CUDA so the GPU's work is inside the interval."""

    def __init__(self, device: torch.device):
        self.sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def repeat(self, fn: Callable[[], Any], warmup: int, repeats: int) -> Timing:
        for _ in range(warmup):
            fn()
        return Timing.of([self(fn) for _ in range(repeats)])

    def interleaved(
        self,
        fns: dict[str, Callable[[], Any]],
        repeats: int,
        calls: Optional[dict[str, int]] = None,
        mirrored: bool = False,
        pause_s: float = 0.0,
    ) -> dict[str, Timing]:
        """Each callable once per round for `repeats` rounds, so that a change in the machine's load
        hits all alike; `calls[name]` runs a short one that many times per round (its time is per call).

        `mirrored` reverses the order every other round (A B C, C B A, ...: ABBA), so that a steady
        drift in load, or the one that runs after another's cost, falls on each alike; `pause_s`
        sleeps before each call, outside the timed interval, so that the thread pool of the one
        before stops spinning on the cores first (needed between different runtimes).
        """
        calls = calls or {}
        seconds: dict[str, list[float]] = {name: [] for name in fns}
        order = list(fns)
        for round_index in range(repeats):
            for name in reversed(order) if mirrored and round_index % 2 else order:
                if pause_s > 0:
                    time.sleep(pause_s)
                n = calls.get(name, 1)
                seconds[name].append(self(_repeated(fns[name], n)) / n)
        return {name: Timing.of(values) for name, values in seconds.items()}


def _repeated(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    """`fn` called `n` times in a row."""

    def run() -> None:
        for _ in range(n):
            fn()

    return run


__all__ = ["Stopwatch", "Timing"]
