"""Group commit: predictions from concurrent requests share one database transaction.

Each request still gets its answer only after its rows are committed, but one commit (and one
SQLite lock, one WAL sync) serves every request that arrived meanwhile. Each group's statements
and commit run under ``write_lock`` (for SQLite, one writer across all web workers; see
``app.core.db.SqliteWriteLock``). If a group's transaction fails, each request in it is retried
alone, so one bad request never fails the others.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from app.core.storage import ImageStore
from app.crud import PredictionBatch, store_batches


@dataclass
class _Job:
    batch: PredictionBatch
    future: Future = field(default_factory=Future)


class GroupWriter:
    """One writer thread draining a bounded queue of prediction batches."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: ImageStore,
        max_group: int = 64,
        max_queue: int = 1024,
        write_lock: AbstractContextManager | None = None,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.write_lock = write_lock if write_lock is not None else nullcontext()
        self.max_group = max_group
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="group-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: PredictionBatch) -> Future:
        job = _Job(batch)
        self._queue.put(job, timeout=30)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        if hasattr(self.write_lock, "close"):
            self.write_lock.close()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.max_group:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
            self._write(jobs)

    def _write(self, jobs: list[_Job]) -> None:
        try:
            with self.sessions() as session:
                batches = [j.batch for j in jobs]
                results = store_batches(session, self.store, batches, self.write_lock)
        except Exception as exc:  # noqa: BLE001 - each request must hear of its own fate
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            for j in jobs:
                self._write([j])
            return
        for j, preds in zip(jobs, results, strict=True):
            j.future.set_result(preds)
