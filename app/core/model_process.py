"""The A/B models in a process of their own, beside the web process.

PyTorch lets go of the GIL inside each operation but takes it back between operations, so a model
called from a thread of the web process waits for the GIL after every layer while the event loop
parses requests and the writer talks to the database. Measured on a 2-core CPU (bench/gil_bench.py):
both models on 16 images took 34-35 ms alone, 293-311 ms beside one busy Python thread, and
41-48 ms through this process beside the same thread (two runs). In a process of its own the
forward pass never waits for the web process; batches cross a pipe (a batch of 16 images at 64 px
is 64 KB).

If the process dies (out of memory, a crash in a native library), the batch it held fails with
``ModelProcessFailed`` (the API answers 503). A watchdog thread sees the death at once and starts a
fresh process, so the requests after it wait for the start rather than fail; ``ping`` (read by
/readyz) names the problem until the new process is up.
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

log = logging.getLogger("maxmin_inspect")
# Set as the interpreter exits, before multiprocessing stops its daemon children (atexit runs the
# handlers registered last first): a watchdog must not take those stops for deaths to repair.
EXITING = threading.Event()
atexit.register(EXITING.set)


class ModelProcessFailed(RuntimeError):
    """The model process could not answer; the message says why."""


def _serve(
    conn: Connection, run_dir: str, names: list[str], device: str, threads: int, parallel: str
) -> None:
    """The child: load the models, then answer batches until the parent goes away."""
    import torch

    from app.core.inference import Classifier

    torch.set_num_threads(threads)
    try:
        classifier = Classifier(Path(run_dir), names, device, parallel)
        classifier.set_threads(threads)
    except Exception as exc:  # noqa: BLE001 - the parent reports it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    gc.collect()
    gc.freeze()  # the models and libraries stay: keep full collections from walking them
    conn.send(("ready", str(classifier.device)))
    while True:
        try:
            arrays = conn.recv()
        except (EOFError, OSError):  # the web process is gone
            return
        if arrays is None:
            return
        try:
            conn.send(("ok", classifier.classify(arrays)))
        except Exception as exc:  # noqa: BLE001 - one bad batch must not end the process
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ModelProcess:
    """Runs ``Classifier.classify`` in a child process; same call, same answers."""

    def __init__(
        self,
        run_dir: Path,
        names: list[str],
        device: str = "auto",
        threads: int = 1,
        start_timeout_s: float = 180.0,
        batch_timeout_s: float = 60.0,
        on_restart: Callable[[], None] | None = None,
        parallel: str = "false",
    ) -> None:
        self._args = (str(Path(run_dir).resolve()), list(names), device, threads, parallel)
        self._on_restart = on_restart  # called each time a new process replaces one (metrics)
        self._starts = 0
        self._start_timeout = start_timeout_s
        self._batch_timeout = batch_timeout_s
        self._lock = threading.Lock()
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._problem: str | None = None  # why no process answers now, for ping()
        self._ready = False  # the current process has loaded the models
        self._closed = threading.Event()
        self.device = self._start()
        self._watchdog = threading.Thread(
            target=self._watch, name="maxmin-models-watchdog", daemon=True
        )
        self._watchdog.start()

    def _start(self) -> str:
        self._ready = False
        ctx = mp.get_context("spawn")  # no fork of a process that holds threads and a CUDA context
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_serve, args=(child, *self._args), name="maxmin-models", daemon=True
        )
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        if not parent.poll(self._start_timeout):
            self._stop(kill=True)
            raise ModelProcessFailed(f"the model process did not start in {self._start_timeout} s")
        try:
            status, payload = parent.recv()
        except (EOFError, OSError):
            code = proc.exitcode
            self._stop(kill=True)
            raise ModelProcessFailed(f"the model process exited at start (code {code})") from None
        if status != "ready":
            self._stop(kill=True)
            raise ModelProcessFailed(payload)
        log.info("model process %s started on %s", proc.pid, payload)
        self._ready, self._problem = True, None
        self._starts += 1
        if self._starts > 1 and self._on_restart is not None:
            self._on_restart()
        return payload

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def ping(self) -> str | None:
        """None while the model process is up, else why not: for readiness checks."""
        if self._closed.is_set():
            return "the model process is shut down"
        proc = self._proc
        if self._ready and proc is not None:
            if proc.is_alive():
                return None
            return f"the model process exited (code {proc.exitcode}); a new one is starting"
        return self._problem or "the model process is starting"

    def _watch(self, retry_s: float = 5.0) -> None:
        """Start a new process as soon as the current one dies, not at the next batch."""
        while not self._closed.is_set():
            proc = self._proc
            if proc is not None:
                wait([proc.sentinel], timeout=1.0)
                if proc.is_alive():
                    continue
            with self._lock:
                if self._closed.is_set() or EXITING.is_set():
                    return
                if self._proc is not None and self._proc.is_alive():
                    continue
                if self._proc is not None:  # died on its own (else stopped by classify)
                    code = self._proc.exitcode
                    self._problem = f"the model process exited (code {code}); a new one is starting"
                log.error("%s", self._problem or "no model process; starting one")
                self._stop(kill=True)
                try:
                    self.device = self._start()
                    continue
                except ModelProcessFailed as exc:
                    self._problem = f"the model process cannot start: {exc}"
                    log.error(self._problem)
            self._closed.wait(retry_s)

    def classify(self, arrays: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        """Per model: class probabilities (N x K) and the model's time per image in ms."""
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._stop(kill=True)
                self.device = self._start()
            conn, proc = self._conn, self._proc
            deadline = time.monotonic() + self._batch_timeout
            try:
                conn.send(np.ascontiguousarray(arrays))
                while not conn.poll(0.5):
                    if not proc.is_alive():
                        raise EOFError
                    if time.monotonic() > deadline:  # hung: never let a request wait forever
                        self._problem = (
                            f"the model process did not answer within {self._batch_timeout:g} s; "
                            "it was stopped and a new one is starting"
                        )
                        self._stop(kill=True)
                        raise ModelProcessFailed(self._problem)
                status, payload = conn.recv()
            except (EOFError, OSError):
                self._problem = (
                    f"the model process stopped (exit code {proc.exitcode}); a new one is starting"
                )
                self._stop(kill=True)
                raise ModelProcessFailed(self._problem) from None
        if status != "ok":
            raise ModelProcessFailed(payload)
        return payload

    def _stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        proc, conn = self._proc, self._conn
        self._proc, self._conn = None, None
        if conn is not None:
            if not kill:
                try:
                    conn.send(None)
                except OSError:
                    pass
            conn.close()
        if proc is not None:
            deadline = time.monotonic() + (0 if kill else timeout)
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._stop()
        self._watchdog.join(5)
