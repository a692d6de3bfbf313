"""The service's metrics in the Prometheus text format (version 0.0.4), written by hand: counters
by path and status code, histograms of latency and batch size, gauges of queue depth and requests
in flight. Updated from the event loop and the model thread, so guarded by a lock."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Paths counted by name; anything else (a scanner's guesses) is "other", so labels stay few.
PATHS = ("/detect", "/model", "/health", "/metrics", "/docs", "/openapi.json")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_number(self.sum)}"]
        return [*out, f"{name}_count {self.count}"]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.detect_seconds = Histogram(LATENCY_BUCKETS)
        self.queue_seconds = Histogram(LATENCY_BUCKETS)
        self.inference_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)

    def request(self, path: str, code: int) -> None:
        with self._lock:
            self.requests[(path if path in PATHS else "other", int(code))] += 1

    def detection(self, total_s: float, queue_s: float) -> None:
        with self._lock:
            self.detect_seconds.observe(total_s)
            self.queue_seconds.observe(queue_s)

    def batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.inference_seconds.observe(seconds)

    def render(self, queue_depth: int, in_flight: int) -> str:
        with self._lock:
            lines = [
                "# HELP m2det_requests_total HTTP requests answered, by path and status code "
                "(499: the client went away before the answer).",
                "# TYPE m2det_requests_total counter",
            ]
            lines += [
                f'm2det_requests_total{{path="{path}",code="{code}"}} {n}'
                for (path, code), n in sorted(self.requests.items())
            ]
            for name, help_text, hist in (
                (
                    "m2det_detect_seconds",
                    "Time of a successful /detect from its body in hand "
                    "to its answer (decode, queue, inference).",
                    self.detect_seconds,
                ),
                ("m2det_queue_seconds", "Time an image waited for a forward pass.", self.queue_seconds),
                ("m2det_inference_seconds", "Time of one forward pass (a batch).", self.inference_seconds),
                ("m2det_batch_size", "Images per forward pass.", self.batch_size),
            ):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.lines(name)]
        lines += [
            "# HELP m2det_queue_depth Images waiting for a forward pass.",
            "# TYPE m2det_queue_depth gauge",
            f"m2det_queue_depth {queue_depth}",
            "# HELP m2det_in_flight /detect requests being received, decoded or detected.",
            "# TYPE m2det_in_flight gauge",
            f"m2det_in_flight {in_flight}",
        ]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))
