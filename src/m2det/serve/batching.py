"""Dynamic batching: one worker thread owns the model; requests queue decoded images and wait on
futures, and the worker runs whatever is queued (up to `max_batch` images, waiting at most
`max_wait_s` after the first for more to arrive) in one forward pass.

With `max_batch=1` every image has a pass of its own (batching off); requests are still answered
one pass at a time, in arrival order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor


@dataclass(frozen=True)
class Timing:
    """How one image's detection went: the wait in the queue, the forward pass (shared by the
    batch: pre-processing, network and post-processing of all its images) and the batch's size."""

    queue_ms: float
    inference_ms: float
    batch_size: int


@dataclass
class _Job:
    image: Tensor
    future: Future
    queued: float


class BatchWorker:
    """Runs `run(images) -> results` (one result per image) on one thread, images batched.

    `on_batch(size, seconds)` is told of every pass (for metrics).
    """

    def __init__(
        self,
        run: Callable[[Sequence[Tensor]], Sequence[Any]],
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        on_batch: Optional[Callable[[int, float], None]] = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.run = run
        self.max_batch = int(max_batch)
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.on_batch = on_batch
        self._queue: queue.Queue[Optional[_Job]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()

    @property
    def queue_depth(self) -> int:
        """Images waiting for a forward pass (not counting the one running)."""
        return self._queue.qsize()

    def submit(self, image: Tensor) -> Future:
        """Queue one image; the future gives `(result, Timing)`. Cancel it to drop a job not yet run."""
        self._ensure_started()
        future: Future = Future()
        self._queue.put(_Job(image, future, time.perf_counter()))
        return future

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after the queued jobs (it is a daemon: a process exit does not wait)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        self._thread = None

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="m2det-model", daemon=True)
                self._thread.start()

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """`first` and what joins it within the wait; True when told to stop."""
        jobs = [first]
        deadline = first.queued + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._collect(first)
            # a job cancelled while queued (its client gave up) is dropped here
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            start = time.perf_counter()
            try:
                results = self.run([job.image for job in jobs])
            except BaseException as exc:  # every waiting request hears of it; the thread goes on
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - start
            if self.on_batch is not None:
                self.on_batch(len(jobs), seconds)
            for job, result in zip(jobs, results):
                timing = Timing((start - job.queued) * 1000, seconds * 1000, len(jobs))
                job.future.set_result((result, timing))
