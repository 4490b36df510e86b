"""Prometheus metrics and structured (JSON) logs carrying a request id.

Metrics live in a registry per app, so several apps in one process (tests) never share counters.
With several uvicorn workers, `maxmin-inspect serve` switches prometheus_client to its multiprocess
mode (PROMETHEUS_MULTIPROC_DIR) and /metrics sums every worker's counts.
"""

from __future__ import annotations

import collections
import contextvars
import copy
import json
import logging
import logging.config
import re
import sys
import threading
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from app.core.asgi import HTTPMiddleware

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
log = logging.getLogger("maxmin_inspect.access")


class Metrics:
    """The service's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "maxmin_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "maxmin_http_errors",
            "HTTP responses with status 400 or more",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "maxmin_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.model_latency = Histogram(
            "maxmin_model_seconds_per_image",
            "Model compute time per image",
            ["model"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
        )
        self.predictions = Counter(
            "maxmin_predictions",
            "Predictions by model and class",
            ["model", "label"],
            registry=self.registry,
        )
        self.disagreements = Counter(
            "maxmin_disagreements", "Images the A/B models disagree on", registry=self.registry
        )
        self.decisions = Counter(
            "maxmin_decisions",
            "Parts accepted, rejected, or sent to review",
            ["action"],
            registry=self.registry,
        )
        self.shadow = Counter(
            "maxmin_shadow_answers",
            "Images the challenger classified in shadow (stored), or missed and why",
            ["outcome"],
            registry=self.registry,
        )
        self.model_restarts = model_restarts_counter(self.registry)
        self.writer_restarts = Counter(
            "maxmin_writer_process_restarts",
            "Database writer processes replaced after dying (MAXMIN_WRITER_PROCESS)",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "maxmin_inference_batch_size",
            "Images per pass",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )


def model_restarts_counter(registry: CollectorRegistry) -> Counter:
    """Model processes replaced after dying or hanging, by which process: a worker's own
    (``worker``), the challenger's in shadow (``shadow``) or the one shared by all workers
    (``shared``, counted by the serve command).
    More than a few an hour points to memory or a driver: alert on its rate."""
    return Counter(
        "maxmin_model_process_restarts",
        "Model processes replaced after dying or hanging",
        ["process"],
        registry=registry,
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request id of the request being served."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,  # which worker, when there are several
            "request_id": request_id_var.get(),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class JsonLinesHandler(logging.Handler):
    """JSON lines on stderr, written by a thread of this process.

    The line is formatted where the record is made (it carries that task's request id); only the
    write leaves the event loop, so a slow reader of stderr (a full pipe to a log collector) holds
    up no request. The thread writes the waiting lines together every ``FLUSH_SECONDS``, and at
    once after a warning or worse: waking it for every access-log line cost each request a thread
    switch (bench/serve_bench.py). Lines wait in memory without bound rather than stall the
    service. Closing writes what waits."""

    FLUSH_SECONDS = 0.05

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self._lines: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: appending to a deque is atomic, and the thread alone writes.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never fail the caller
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self._wake.set()

    def flush(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.FLUSH_SECONDS)
            self._wake.clear()
            self._write()
        self._write()

    def _write(self) -> None:
        lines = []
        while self._lines:
            lines.append(self._lines.popleft())
        if not lines:
            return
        try:
            sys.stderr.write("".join(lines))
            sys.stderr.flush()
        except (OSError, ValueError):  # stderr closed or gone: nothing left to tell
            pass

    def close(self) -> None:
        if not self._stopping:  # logging closes handlers more than once
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout=5)
        super().close()


def log_config(level: str = "INFO") -> dict[str, Any]:
    """uvicorn's own logging set-up plus the service's JSON lines, as one ``dictConfig``. uvicorn
    applies it in every worker process it starts (each a fresh interpreter), so each worker writes
    its access log, not only the process that ran ``serve``."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["maxmin_json"] = {"()": JsonLinesHandler}
    config["loggers"]["maxmin_inspect"] = {
        "handlers": ["maxmin_json"],
        "level": level,
        "propagate": False,
    }
    return config


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the service's loggers, in this process."""
    logging.config.dictConfig(log_config(level))


class ObserveMiddleware(HTTPMiddleware):
    """Give each request an id (or keep a valid X-Request-ID), time it, count it, log it.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs each
    request through extra tasks and memory streams, which showed up as a tenth of the web process's
    time under load.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = Headers(scope=scope).get("x-request-id", "")
        rid = incoming if _VALID_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # The client went away mid-request (a line system's timeout, a closed tablet): its
            # doing, not an error of ours; nobody is left to answer. Counted and logged as 499,
            # nginx's "client closed request", in the one access-log line below.
            status = 499
        finally:
            elapsed = time.perf_counter() - start
            method, path = scope["method"], scope["path"]
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics: Metrics = scope["app"].state.metrics
            metrics.requests.labels(method, route, str(status)).inc()
            metrics.latency.labels(method, route).observe(elapsed)
            if status >= 400:
                metrics.errors.labels(route, str(status)).inc()
            log.info(
                "%s %s %s",
                method,
                path,
                status,
                extra={
                    "fields": {
                        "method": method,
                        "path": path,
                        "route": route,
                        "status": status,
                        "ms": round(elapsed * 1000, 3),
                    }
                },
            )
            request_id_var.reset(token)
