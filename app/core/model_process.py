"""The A/B models in a process of their own, beside the web process.

PyTorch lets go of the GIL inside each operation but takes it back between operations, so a model
called from a thread of the web process waits for the GIL after every layer while the event loop
parses requests and the writer talks to the database (``bench/gil_bench.py`` measures how much).
In a process of its own the forward pass never waits for the web process; batches cross a pipe as
uint8 arrays. ``app/core/supervisor.py`` starts, watches and restarts it.

If the process dies (out of memory, a crash in a native library), the batch it held fails with
``ModelProcessFailed`` (the API answers 503). A watchdog thread sees the death at once and starts a
fresh process, so the requests after it wait for the start rather than fail; ``ping`` (read by
/readyz) names the problem until the new process is up.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.core.supervisor import EXITING, ChildProcess, Watchdog

if TYPE_CHECKING:
    from app.core.inference import Classifier

log = logging.getLogger("maxmin_inspect")


class ModelProcessFailed(RuntimeError):
    """The model process could not answer; the message says why."""


@dataclass(frozen=True)
class ModelsToLoad:
    """What a child process loads: the named models of a run, on a device, with its threads and
    its choice of running the models in parallel. Shared by the model process and the host."""

    run_dir: Path
    names: tuple[str, ...]
    device: str = "auto"
    threads: int = 1
    parallel: str = "false"
    runtime: str = "torch"  # or onnxruntime: the run's ONNX forms (inspectlib.onnxform)
    form: str = "fp32"  # or int8 (onnxruntime only)

    def resolved(self) -> ModelsToLoad:
        """The same with an absolute run folder: what a child process is given."""
        return replace(self, run_dir=Path(self.run_dir).resolve())

    def load(self, run_dir: Path | None = None) -> Classifier:
        """In the child: set its torch threads and load the models (of ``run_dir`` when given)."""
        import torch

        from app.core.inference import Classifier

        torch.set_num_threads(self.threads)
        return Classifier(
            Path(run_dir or self.run_dir),
            list(self.names),
            self.device,
            self.parallel,
            runtime=self.runtime,
            form=self.form,
            threads=self.threads,
        )


def _serve(models: ModelsToLoad, conn: Connection) -> None:
    """The child: load the models, then answer batches until the parent goes away."""
    try:
        classifier = models.load()
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
        models: ModelsToLoad,
        *,
        start_timeout_s: float = 180.0,
        batch_timeout_s: float = 60.0,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self._child = ChildProcess(
            "the model process",
            _serve,
            (models.resolved(),),
            ModelProcessFailed,
            start_timeout_s,
            name="maxmin-models",
            on_restart=on_restart,
        )
        self._batch_timeout = batch_timeout_s
        self._lock = threading.Lock()
        self._problem: str | None = None  # why no process answers now, for ping()
        self._closed = threading.Event()
        self.device = self._child.start()
        self._watchdog = Watchdog(self._child, self._restart, self._closed)

    def _restart(self) -> bool:
        """The watchdog's repair: a new process for one that died (or that ``classify`` stopped)."""
        with self._lock:
            if self._closed.is_set() or EXITING.is_set() or self._child.alive():
                return True
            died = self._child.died()
            if died is not None:  # died on its own (else stopped by classify, which said why)
                self._problem = f"{died}; a new one is starting"
            log.error("%s", self._problem or "no model process; starting one")
            self._child.stop(kill=True)
            try:
                self.device = self._child.start()
            except ModelProcessFailed as exc:
                self._problem = f"the model process cannot start: {exc}"
                log.error(self._problem)
                return False
            self._problem = None
            return True

    @property
    def pid(self) -> int | None:
        return self._child.pid

    def ping(self) -> str | None:
        """None while the model process is up, else why not: for readiness checks."""
        if self._closed.is_set():
            return "the model process is shut down"
        if self._child.ready:
            died = self._child.died()
            return None if died is None else f"{died}; a new one is starting"
        return self._problem or "the model process is starting"

    def classify(self, arrays: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        """Per model: class probabilities (N x K) and the model's time per image in ms."""
        with self._lock:
            if not self._child.alive():
                self._child.stop(kill=True)
                self.device = self._child.start()
            conn, proc = self._child.conn, self._child.proc
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
                        self._child.stop(kill=True)
                        raise ModelProcessFailed(self._problem)
                status, payload = conn.recv()
            except (EOFError, OSError):
                self._problem = (
                    f"the model process stopped (exit code {proc.exitcode}); a new one is starting"
                )
                self._child.stop(kill=True)
                raise ModelProcessFailed(self._problem) from None
        if status != "ok":
            raise ModelProcessFailed(payload)
        return payload

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._child.stop(goodbye=True)
        self._watchdog.join(5)
