"""Helper processes beside the web process: one way to start them, wait until they are ready,
notice their death, start a new one and stop them.

Three helpers use it: the model process (``model_process.py``), the model host shared by several
workers (``model_host.py``) and the writer process (``writer.py``). Each child gets one end of a
pipe and, once it can work, sends ``("ready", payload)`` on it, or ``("error", message)`` when it
cannot start; the parent's ``ChildProcess.start`` waits for that message (the handshake) and
raises the helper's own error type with the reason otherwise. A ``Watchdog`` thread starts a new
child as soon as the current one dies, not at the next request that needs it.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger("maxmin_inspect")
# Set as the interpreter exits, before multiprocessing stops its daemon children (atexit runs the
# handlers registered last first): a watchdog must not take those stops for deaths to repair.
EXITING = threading.Event()
atexit.register(EXITING.set)


def exit_when_orphaned(parent: int) -> None:
    """In a child: end this process once ``parent`` is gone, even killed, so no helper outlives
    the process it served."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


class ChildProcess:
    """One helper process at a time: spawned with a pipe, ready after its handshake.

    ``target(*args, conn)`` runs in the child (a fresh interpreter: no fork of a process that
    holds threads and a CUDA context). ``what`` names it in messages ("the model process");
    ``error`` is the exception a failed start raises. ``on_restart`` is called each time a child
    after the first becomes ready (the restart counters in /metrics)."""

    def __init__(
        self,
        what: str,
        target: Callable[..., None],
        args: tuple,
        error: type[Exception],
        start_timeout_s: float,
        name: str,
        duplex: bool = True,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.what = what
        self._target, self._args, self._name, self._duplex = target, args, name, duplex
        self.error = error
        self.start_timeout_s = start_timeout_s
        self.on_restart = on_restart
        self.proc: mp.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.ready = False
        self.starts = 0  # children that became ready

    def spawn(self) -> None:
        """Start a child; ``handshake`` waits for it (the caller may do other work meanwhile)."""
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=self._duplex)
        proc = ctx.Process(
            target=self._target, args=(*self._args, theirs), name=self._name, daemon=True
        )
        proc.start()
        theirs.close()
        self.proc, self.conn, self.ready = proc, ours, False

    def handshake(self) -> Any:  # noqa: ANN401 - what the child reported, e.g. its device
        """Wait for the child's ready message; returns its payload. Raises ``error`` naming why
        the child did not start (it is stopped then)."""
        proc, conn = self.proc, self.conn
        try:
            if not conn.poll(self.start_timeout_s):
                raise self.error(f"{self.what} did not start in {self.start_timeout_s:g} s")
            try:
                status, payload = conn.recv()
            except (EOFError, OSError):
                proc.join(5)
                raise self.error(f"{self.what} exited at start (code {proc.exitcode})") from None
            if status != "ready":
                raise self.error(payload)
        except BaseException:
            self.stop(kill=True)
            raise
        self.ready = True
        self.starts += 1
        log.info("%s %s started: %s", self.what, proc.pid, payload)
        if self.starts > 1 and self.on_restart is not None:
            self.on_restart()
        return payload

    def start(self) -> Any:  # noqa: ANN401
        """Spawn a child and wait until it is ready; returns its ready payload."""
        self.spawn()
        return self.handshake()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def died(self) -> str | None:
        """Why the child is gone (its exit code), or None while it runs or before the first."""
        if self.proc is None or self.proc.is_alive():
            return None
        return f"{self.what} exited (code {self.proc.exitcode})"

    def stop(
        self,
        kill: bool = False,
        timeout_s: float = 10.0,
        goodbye: bool = False,
        terminate: bool = False,
    ) -> None:
        """Stop the child: ``goodbye`` sends it ``None`` (its sign to finish and exit), then wait
        up to ``timeout_s``; ``terminate`` sends SIGTERM first; ``kill`` does not wait at all.
        Whatever is still alive then is killed."""
        proc, conn = self.proc, self.conn
        self.proc, self.conn, self.ready = None, None, False
        if conn is not None:
            if goodbye and not kill:
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
            conn.close()
        if proc is None:
            return
        if terminate and not kill and proc.is_alive():
            proc.terminate()
        proc.join(0 if kill else timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


class Watchdog:
    """A thread that calls ``restart`` as soon as the child of ``child`` dies, until ``closed``
    is set or the interpreter exits. ``restart`` returns True when a new child is up; after a
    failed restart it is tried again every ``retry_s``."""

    def __init__(
        self,
        child: ChildProcess,
        restart: Callable[[], bool],
        closed: threading.Event,
        retry_s: float = 5.0,
    ) -> None:
        self._child, self._restart, self._closed, self._retry_s = child, restart, closed, retry_s
        self._thread = threading.Thread(
            target=self._run, name=f"watchdog-{child._name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            proc = self._child.proc
            if proc is not None:
                wait([proc.sentinel], timeout=1.0)
                if proc.is_alive():
                    continue
            if self._closed.is_set() or EXITING.is_set():
                return
            if not self._restart():
                self._closed.wait(self._retry_s)

    def join(self, timeout_s: float = 5.0) -> None:
        self._thread.join(timeout_s)
