"""Micro-batching: concurrent requests share one pass through the A/B models.

One worker thread feeds the models through a ``ModelRunner`` (in the service, usually
``ModelProcess``, which runs them in a process of their own). It takes the first waiting image,
gathers whatever else arrives within ``max_wait_ms`` (up to ``max_batch`` images), runs both models
once on the batch, and hands each request its rows. While requests the caller has announced
(``coming``: their images are being decoded) are still on their way, it waits for them up to
``decoding_wait_ms``: under load a pass that left just before them would run the models again for
one image, and the fixed cost of a pass is most of a small CNN's; with nothing on its way (one
client) nothing waits. Small CNNs are bound by per-call overhead, so
one batch of 32 costs far less than 32 single calls; and with one caller of torch there is no
oversubscription of cores. The queue is bounded: when it is full, new work is refused at once (503)
instead of piling up.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from app.core.inference import ModelRunner


class Overloaded(RuntimeError):
    """The queue is full: the caller should retry later."""


@dataclass
class BatchResult:
    """One request's rows of a batch: per model (probabilities, ms per image), and timings."""

    outputs: dict[str, tuple[np.ndarray, float]]
    queue_ms: float
    model_ms: float
    batch_size: int


@dataclass
class _Job:
    arrays: np.ndarray
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """A bounded queue in front of the classifier, served by one worker thread."""

    def __init__(
        self,
        classifier: ModelRunner,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        max_queue: int = 512,
        decoding_wait_ms: float = 0.0,
    ) -> None:
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.decoding_wait = decoding_wait_ms / 1000
        self._coming = 0  # announced requests not yet submitted (changed by one thread only)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, arrays: np.ndarray) -> Future:
        """Queue N images (N x C x S x S uint8); the future resolves to a BatchResult."""
        job = _Job(arrays)
        with self._lock:
            if self._closed:  # retired: these models are no longer served
                raise Overloaded("the models are being replaced, retry shortly")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise Overloaded("inference queue full, retry shortly") from None
        return job.future

    @contextmanager
    def coming(self) -> Iterator[None]:
        """Announce a request whose images will be submitted when decoded (or never, if the
        decoding fails). Call from one thread: the service's event loop."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    def close(self) -> None:
        """Finish the work already queued, refuse new work, stop the thread."""
        with self._lock:
            self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, count = [job], len(job.arrays)
            start = time.perf_counter()
            deadline = start + self.max_wait
            while count < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    until = deadline
                    if self._coming > 0:
                        until = max(until, start + self.decoding_wait)
                    remaining = until - time.perf_counter()
                    if remaining <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                jobs.append(nxt)
                count += len(nxt.arrays)
            self._process(jobs)

    def _process(self, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            batch = np.concatenate([j.arrays for j in jobs]) if len(jobs) > 1 else jobs[0].arrays
            results = self.classifier.classify(batch)
        except Exception as exc:  # noqa: BLE001 - every waiting request must hear of it
            for j in jobs:
                j.future.set_exception(exc)
            return
        model_ms = (time.perf_counter() - start) * 1000
        offset = 0
        for j in jobs:
            n = len(j.arrays)
            rows = {name: (probs[offset : offset + n], ms) for name, (probs, ms) in results.items()}
            offset += n
            j.future.set_result(
                BatchResult(rows, (start - j.enqueued) * 1000, model_ms, len(batch))
            )
