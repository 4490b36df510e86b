"""One model process for all web workers: the A/B models loaded once, batches merged across
workers.

With several web workers, a model process per worker means one copy of the models, one micro-batch
and, on a GPU, one CUDA context per worker: the contexts take turns on the GPU and each pass holds
only that worker's share of the requests in flight. ``maxmin-inspect serve --workers N`` (N > 1)
starts one ``ModelHost`` instead, before the workers; each worker sends its micro-batches to it
over a Unix socket (``ModelHostClient``, the same ``classify`` as ``ModelProcess``), and the host
runs whatever batches are waiting, from every worker, as one pass through both models.

The socket lives in a private temporary folder and the connection is authenticated with a key
that only the serve command and its workers know. If the host dies, the requests it held get 503
("models unavailable"); the serve command starts a new host at the same address, and the workers
reconnect with their next batch.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener
from pathlib import Path

import numpy as np

from app.core.model_process import ModelProcessFailed, ModelsToLoad
from app.core.supervisor import EXITING, ChildProcess, Watchdog, exit_when_orphaned

log = logging.getLogger("maxmin_inspect")
# Runs the host keeps loaded: the served one, the challenger in shadow, and one being switched to.
KEEP_RUNS = 3


def _send(conn: Connection, message: object) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):  # that worker went away: nothing to tell it
        pass


def _answer(classifier, jobs: list[tuple[Connection, np.ndarray]]) -> None:  # noqa: ANN001
    """One pass for every waiting batch; each worker gets its rows, or its own error."""
    try:
        arrays = np.concatenate([a for _, a in jobs]) if len(jobs) > 1 else jobs[0][1]
        results = classifier.classify(arrays)
    except Exception as exc:  # noqa: BLE001 - one bad batch must fail alone
        if len(jobs) > 1:
            for job in jobs:
                _answer(classifier, [job])
            return
        _send(jobs[0][0], ("error", f"{type(exc).__name__}: {exc}"))
        return
    offset = 0
    for conn, a in jobs:
        n = len(a)
        rows = {name: (probs[offset : offset + n], ms) for name, (probs, ms) in results.items()}
        offset += n
        _send(conn, ("ok", rows))


def _host_main(
    address: str,
    authkey: bytes,
    models: ModelsToLoad,
    ready: Connection,
) -> None:
    """The host process: load the models, listen, and answer merged batches until stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the serve command stops it
    parent = os.getppid()
    from app.core.inference import Classifier

    run_dir, names = str(models.run_dir), list(models.names)
    # The runs loaded, least recently used first: the one being served, and the next one while
    # the workers switch to it (they ask for it with "load" before they send it batches).
    classifiers: dict[str, Classifier] = {}
    loading = threading.Lock()

    def get(run: str) -> Classifier:
        with loading:
            classifier = classifiers.pop(run, None)
            if classifier is None:
                classifier = models.load(Path(run))
                while len(classifiers) >= KEEP_RUNS:
                    classifiers.pop(next(iter(classifiers)))
            classifiers[run] = classifier
            return classifier

    try:
        classifier = get(run_dir)
        if os.path.exists(address):
            os.unlink(address)  # left by a host that died
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
    except Exception as exc:  # noqa: BLE001 - the serve command reports it
        ready.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    info = {"device": str(classifier.device), "run_dir": run_dir, "names": names}
    stats = {"passes": 0, "requests": 0}
    work: queue.Queue[tuple[Connection, str, np.ndarray]] = queue.Queue()

    def read(conn: Connection) -> None:
        while True:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError, ValueError, TypeError):
                conn.close()
                return
            if kind == "info":
                _send(conn, ("ok", info | stats | {"runs": list(classifiers)}))
            elif kind == "load":  # in this connection's thread: batches of other runs go on
                try:
                    get(str(payload))
                    _send(conn, ("ok", None))
                except Exception as exc:  # noqa: BLE001 - the worker reports it
                    _send(conn, ("error", f"cannot load {payload}: {type(exc).__name__}: {exc}"))
            else:
                run, arrays = payload
                work.put((conn, str(run), arrays))

    def accept() -> None:
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, EOFError, OSError):
                continue  # a client that failed the handshake
            threading.Thread(target=read, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    exit_when_orphaned(parent)  # the serve command is gone (even killed): so is its host
    gc.collect()
    gc.freeze()
    ready.send(("ready", info["device"]))
    ready.close()
    while True:
        jobs = [work.get()]
        while True:  # every batch waiting now, from every worker (at most one per worker)
            try:
                jobs.append(work.get_nowait())
            except queue.Empty:
                break
        by_run: dict[str, list[tuple[Connection, np.ndarray]]] = {}
        for conn, run, arrays in jobs:
            by_run.setdefault(run, []).append((conn, arrays))
        for run, group in by_run.items():
            try:
                classifier = get(run)
            except Exception as exc:  # noqa: BLE001 - those workers hear why
                for conn, _ in group:
                    _send(conn, ("error", f"cannot load {run}: {type(exc).__name__}: {exc}"))
                continue
            stats["passes"] += 1
            stats["requests"] += len(group)
            _answer(classifier, group)


class ModelHost:
    """Starts the host process, restarts it if it dies, and tells workers how to reach it."""

    def __init__(
        self,
        models: ModelsToLoad,
        *,
        start_timeout_s: float = 180.0,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self._folder = tempfile.mkdtemp(prefix="maxmin-models-")  # mode 0700: this user only
        self.address = os.path.join(self._folder, "models.sock")
        self.authkey = os.urandom(32)
        self._child = ChildProcess(
            "the model host",
            _host_main,
            (self.address, self.authkey, models.resolved()),
            ModelProcessFailed,
            start_timeout_s,
            name="maxmin-models",
            duplex=False,  # the ready message only; batches come over the socket
            on_restart=on_restart,
        )
        self._stopping = threading.Event()
        try:
            self.device = self._child.start()
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        self._watchdog = Watchdog(self._child, self._restart, self._stopping)

    def _restart(self) -> bool:
        if self._stopping.is_set() or EXITING.is_set():
            return True
        log.error("%s; starting a new one", self._child.died() or "the model host is gone")
        try:
            self._child.start()
        except ModelProcessFailed as exc:
            log.error("model host did not restart: %s; trying again in 5 s", exc)
            return False
        return True

    @property
    def pid(self) -> int | None:
        return self._child.pid

    def env(self) -> dict[str, str]:
        """What a worker needs to reach the host (read by ``Settings``)."""
        return {"MAXMIN_MODEL_HOST": self.address, "MAXMIN_MODEL_HOST_KEY": self.authkey.hex()}

    def close(self) -> None:
        self._stopping.set()
        self._child.stop(terminate=True)
        shutil.rmtree(self._folder, ignore_errors=True)


class ModelHostUnreachable(ModelProcessFailed):
    """The shared model process cannot be reached: it died and the serve command is starting a
    new one, so a worker tries again at its next check rather than giving up on the run."""


class ModelHostClient:
    """A worker's connection to the host: ``classify`` as in ``ModelProcess``, one batch at a
    time; a lost connection fails the batch (503) and the next batch reconnects."""

    def __init__(self, address: str, authkey: bytes, batch_timeout_s: float = 60.0) -> None:
        self.address = address
        self._authkey = authkey
        self._batch_timeout = batch_timeout_s
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        info = self.info()
        self.device: str = info["device"]
        self.run_dir = Path(info["run_dir"])

    def _call(self, kind: str, payload: object) -> object:
        with self._lock:
            for attempt in range(2):
                fresh = self._conn is None
                try:
                    if fresh:
                        self._conn = Client(self.address, family="AF_UNIX", authkey=self._authkey)
                    conn = self._conn
                    conn.send((kind, payload))
                    if not conn.poll(self._batch_timeout):
                        self._drop()  # a late answer must never reach the next batch
                        raise ModelProcessFailed(
                            f"the model host did not answer within {self._batch_timeout:g} s"
                        )
                    status, result = conn.recv()
                    break
                except (EOFError, OSError, AuthenticationError) as exc:
                    self._drop()
                    if fresh or attempt:
                        raise ModelHostUnreachable(
                            f"the shared model process is not answering ({type(exc).__name__}); "
                            "the service restarts it, retry shortly"
                        ) from None
                    # A connection to a host that has died since: a new host may be up already,
                    # and a call has no side effects, so once more on a new connection.
        if status != "ok":
            raise ModelProcessFailed(result)
        return result

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def ping(self, timeout_s: float = 2.0) -> str | None:
        """None when the host answers within ``timeout_s`` on a connection of its own (a batch in
        flight does not delay it), else why not: for readiness checks."""
        problem = self._ping(timeout_s)
        return f"{problem}; it is being restarted" if problem else None

    def _ping(self, timeout_s: float) -> str | None:
        try:
            conn = Client(self.address, family="AF_UNIX", authkey=self._authkey)
        except (OSError, EOFError, AuthenticationError) as exc:
            return f"the model process is not reachable ({type(exc).__name__})"
        try:
            conn.send(("info", None))
            if not conn.poll(timeout_s):
                return f"the model process did not answer within {timeout_s:g} s"
            conn.recv()
            return None
        except (OSError, EOFError) as exc:
            return f"the model process closed the connection ({type(exc).__name__})"
        finally:
            conn.close()

    def info(self) -> dict:
        """The host's device, first run, runs loaded and counters (passes, requests)."""
        return self._call("info", None)

    def load(self, run_dir: Path) -> None:
        """Have the host load ``run_dir``'s models (before sending it that run's batches)."""
        self._call("load", str(Path(run_dir).resolve()))

    def classify(
        self, arrays: np.ndarray, run_dir: Path | None = None
    ) -> dict[str, tuple[np.ndarray, float]]:
        """Per model: class probabilities (N x K) and the model's time per image in ms, from the
        models of ``run_dir`` (default: the run the host started with)."""
        run = str(Path(run_dir or self.run_dir).resolve())
        return self._call("classify", (run, np.ascontiguousarray(arrays)))

    def close(self) -> None:
        with self._lock:
            self._drop()


class HostRun:
    """The shared host bound to one run: what a worker's batcher calls while it serves that run."""

    def __init__(self, client: ModelHostClient, run_dir: Path) -> None:
        self.client = client
        self.run_dir = Path(run_dir).resolve()
        client.load(self.run_dir)
        self.device = client.device

    def classify(self, arrays: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        return self.client.classify(arrays, self.run_dir)

    def ping(self, timeout_s: float = 2.0) -> str | None:
        return self.client.ping(timeout_s)

    def close(self) -> None:
        """Nothing of its own to close: the connection serves the worker's next run too."""
