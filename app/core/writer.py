"""Group commit: predictions from concurrent requests share one database transaction.

Each request still gets its answer only after its rows are committed, but one commit (and one
SQLite lock, one WAL sync) serves every request that arrived meanwhile. Each group's statements
and commit run under ``write_lock`` (for SQLite, one writer across all web workers; see
``app.core.db.SqliteWriteLock``). If a group's transaction fails, each request in it is retried
alone, so one bad request never fails the others.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.core.storage import ImageStore, open_store
from app.core.supervisor import EXITING, ChildProcess, exit_when_orphaned
from app.crud.writes import PredictionBatch, StoredPrediction, WriteTiming, store_batches

log = logging.getLogger("maxmin_inspect")


@dataclass
class Written:
    """A request's stored predictions, and where its group commit's time went."""

    predictions: list[StoredPrediction]
    timing: WriteTiming


@dataclass
class _Job:
    batch: PredictionBatch
    future: Future = field(default_factory=Future)


class GroupWriter:
    """One writer thread draining a bounded queue of prediction batches; each ``submit`` gives a
    future of the request's ``Written``."""

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
        timing = WriteTiming()
        try:
            with self.sessions() as session:
                batches = [j.batch for j in jobs]
                results = store_batches(session, self.store, batches, self.write_lock, timing)
        except Exception as exc:  # noqa: BLE001 - each request must hear of its own fate
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            for j in jobs:
                self._write([j])
            return
        for j, preds in zip(jobs, results, strict=True):
            j.future.set_result(Written(preds, timing))


class WriterUnavailable(RuntimeError):
    """The database writer process could not take or finish a request (503, retry)."""


def _portable(exc: BaseException) -> tuple:
    """An exception as plain values that survive the trip to the worker, where ``_rebuild`` makes
    an exception of the same kind: the service's handlers answer storage and database outages
    with 503."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, OSError):
        return ("os", exc.errno, exc.strerror or str(exc))
    if isinstance(exc, DBAPIError):  # OperationalError, IntegrityError, ...
        return ("db", type(exc).__name__, str(exc.orig))
    return ("other", f"{type(exc).__name__}: {exc}")


def _rebuild(payload: tuple) -> BaseException:
    import sqlalchemy.exc

    kind, *rest = payload
    if kind == "os":
        return OSError(*rest)
    if kind == "db":
        name, message = rest
        cls = getattr(sqlalchemy.exc, name, sqlalchemy.exc.DBAPIError)
        return cls(None, None, Exception(message))
    if kind == "unavailable":
        return WriterUnavailable(rest[0])
    return RuntimeError(rest[0])


def _writer_main(
    db_url: str,
    images_dir: str,
    max_group: int,
    image_sync: str,
    image_store: tuple[str | None, str | None],
    conn: Connection,
) -> None:
    """The writer process: a ``GroupWriter`` fed over ``conn``, each answer sent back by key."""
    # The worker stops it (after what was submitted is written), or it ends when the worker dies;
    # a signal to the whole process group must not drop requests the worker still waits for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    from app.core.db import make_engine, session_factory, write_lock

    engine = make_engine(db_url)
    writer = GroupWriter(
        session_factory(engine),
        open_store(Path(images_dir), image_sync, *image_store),
        max_group=max_group,
        write_lock=write_lock(db_url),
    )
    sending = threading.Lock()

    def reply(key: int, future: Future) -> None:
        exc = future.exception()
        message = (key, "ok", future.result()) if exc is None else (key, "error", _portable(exc))
        with sending:
            try:
                conn.send(message)
            except (OSError, ValueError):  # the worker is gone: nobody to tell
                pass

    exit_when_orphaned(parent)  # the worker is gone (even killed): so is its writer
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        key, batch = message
        try:
            writer.submit(batch).add_done_callback(partial(reply, key))
        except queue.Full:
            with sending:
                conn.send((key, "error", ("unavailable", "the database writer is overloaded")))
    writer.close()  # what was submitted is written and answered first
    engine.dispose()
    conn.close()


class WriterProcess:
    """A ``GroupWriter`` in a process of its own; ``submit`` as ``GroupWriter.submit``.

    Why: under load a web worker's event loop holds the GIL most of the time, and a writer thread
    beside it waits for the GIL after every system call it makes (each file write and fsync, each
    SQLite step), while holding the SQLite write lock that every other worker waits for
    (``bench/writer_bench.py --one-group`` measures it). In a process of its own the writer has a
    GIL of its own.

    If the process dies, the requests it held fail with ``WriterUnavailable`` (503) and a new
    process starts at once; a request whose rows were committed just before may have stored them.
    """

    def __init__(
        self,
        db_url: str,
        images_dir: Path,
        max_group: int = 64,
        image_sync: str = "group",
        start_timeout_s: float = 60.0,
        wait: bool = True,
        on_restart: Callable[[], None] | None = None,
        image_store: tuple[str | None, str | None] = (None, None),
    ) -> None:
        self._child = ChildProcess(
            "the database writer",
            _writer_main,
            (db_url, str(images_dir), max_group, image_sync, image_store),
            WriterUnavailable,
            start_timeout_s,
            name="maxmin-writer",
            on_restart=on_restart,
        )
        self._lock = threading.Lock()  # the connection, the pending futures
        self._pending: dict[int, Future] = {}
        self._keys = itertools.count()
        self._closing = False
        self._conn: Connection | None = None  # the ready child's end, None while there is none
        self.restarts = 0
        self._reader: threading.Thread | None = None
        self._child.spawn()
        if wait:
            self.wait_ready()

    def _handshake(self) -> None:
        self._child.handshake()
        with self._lock:
            self._conn = self._child.conn

    def _start(self) -> None:
        self._child.spawn()
        self._handshake()

    def wait_ready(self) -> None:
        """Wait for the process started by the constructor (the service loads its models
        meanwhile); raises ``WriterUnavailable`` if it did not start."""
        if self._reader is None:
            self._handshake()
            self._reader = threading.Thread(target=self._read, name="writer-reader", daemon=True)
            self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._child.pid

    def submit(self, batch: PredictionBatch) -> Future:
        future: Future = Future()
        with self._lock:  # sends never interleave
            if self._closing or self._conn is None:
                raise WriterUnavailable(
                    "the service is stopping"
                    if self._closing
                    else "the database writer is restarting, retry shortly"
                )
            key = next(self._keys)
            self._pending[key] = future
            try:
                self._conn.send((key, batch))
            except (OSError, ValueError) as exc:
                self._pending.pop(key, None)
                raise WriterUnavailable(
                    f"the database writer is not answering ({type(exc).__name__}); it is being "
                    "restarted, retry shortly"
                ) from None
        return future

    def _read(self) -> None:
        """Answers to futures; when the process goes, fail what it held and start a new one."""
        while True:
            conn = self._conn
            try:
                key, status, payload = conn.recv()
            except (EOFError, OSError):
                if self._gone():
                    return
                continue
            with self._lock:
                future = self._pending.pop(key, None)
            if future is None:
                continue
            if status == "ok":
                future.set_result(payload)
            else:
                future.set_exception(_rebuild(payload))

    def _gone(self) -> bool:
        """The process closed its end: True when that was the end of the service."""
        proc = self._child.proc
        with self._lock:
            pending, self._pending = self._pending, {}
            self._conn = None
            closing = self._closing
        self._child.stop()  # it closed its end: it exits, or is killed if it hangs
        reason = WriterUnavailable(
            f"the database writer exited (code {proc.exitcode}); a new one is starting, retry"
        )
        for future in pending.values():
            future.set_exception(reason)
        if closing or EXITING.is_set():
            return True
        log.error("database writer exited (code %s); starting a new one", proc.exitcode)
        while True:
            try:
                self._start()  # counted in /metrics by the child's on_restart
                self.restarts += 1
                return False
            except WriterUnavailable as exc:
                log.error("database writer did not restart: %s; trying again in 5 s", exc)
                time.sleep(5)
                if self._closing:
                    return True

    def close(self) -> None:
        """Write what was submitted, then stop the process."""
        with self._lock:
            self._closing = True
            conn = self._conn
            if conn is not None:
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
        if self._reader is not None:
            self._reader.join(timeout=60)
        self._child.stop(kill=True)  # whatever is still alive once the reader has ended
