"""The FastAPI app factory and its lifespan: database check, image store, A/B models."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware

from app.api.routes import (
    health,
    images,
    metrics,
    pages,
    predictions,
    reports,
    stats,
    training,
)
from app.core.batcher import MicroBatcher
from app.core.config import Settings, get_settings
from app.core.db import check_schema, make_engine, session_factory, write_lock
from app.core.inference import Classifier, ModelsUnavailable, ServedRun
from app.core.limits import BodyLimitMiddleware
from app.core.model_host import HostRun, ModelHostClient, ModelHostUnreachable
from app.core.model_process import ModelProcess, ModelProcessFailed
from app.core.observability import Metrics, ObserveMiddleware
from app.core.security import KeyCache, session_secret
from app.core.storage import ImageStore
from app.core.writer import GroupWriter, WriterProcess
from app.crud import keep_serving, serving_run
from inspectlib.checkpoint import CheckpointError

log = logging.getLogger("maxmin_inspect")
HERE = Path(__file__).resolve().parent


def find_run_dir(settings: Settings, sessions) -> Path | None:  # noqa: ANN001
    """The run to serve: the setting, else the registered run most recently chosen to serve
    (`POST /reports/{id}/serve`; before any choice, the newest registered), else the newest on
    disk."""
    if settings.run_dir is not None:
        return settings.run_dir
    try:
        with sessions() as session:
            run = serving_run(session)
        if run is not None and Path(run.run_dir).is_dir():
            return Path(run.run_dir)
    except DBAPIError:
        pass
    found = sorted(settings.runs_dir.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


LOAD_ERRORS = (ModelsUnavailable, ModelProcessFailed, CheckpointError, ValueError, OSError)


def build_models(app: FastAPI, run_dir: Path) -> tuple[ServedRun, object]:
    """What the web process holds of ``run_dir``'s models (decoding, classes, versions) and the
    runner of the models.

    Raises one of LOAD_ERRORS, naming the problem."""
    settings: Settings = app.state.settings
    if settings.model_host:
        # `serve` with several workers: the models run once, in the host it started.
        if getattr(app.state, "host", None) is None:
            app.state.host = ModelHostClient(
                settings.model_host,
                bytes.fromhex(settings.model_host_key or ""),
                settings.model_timeout_seconds,
            )
        runner = HostRun(app.state.host, run_dir)
        return ServedRun(run_dir, settings.ab_models), runner
    if not settings.model_process:
        classifier = Classifier(
            run_dir, settings.ab_models, settings.device, settings.parallel_models
        )
        return classifier, classifier
    # The models run in their own process; this one only decodes and names things.
    served = ServedRun(run_dir, settings.ab_models)
    runner = ModelProcess(
        run_dir,
        settings.ab_models,
        settings.device,
        settings.threads,
        batch_timeout_s=settings.model_timeout_seconds,
        on_restart=app.state.metrics.model_restarts.labels("worker").inc,
        parallel=settings.parallel_models,
    )
    return served, runner


def install_models(app: FastAPI, classifier: ServedRun, runner: object) -> tuple:
    """Serve ``classifier`` through ``runner`` from now on; returns what served before.

    A request takes the classifier once and sends its images to that classifier's own batcher, so
    a request that began before a switch is finished by the models it was decoded for."""
    settings: Settings = app.state.settings
    batcher = MicroBatcher(
        runner, settings.batch_max_size, settings.batch_wait_ms, settings.queue_max
    )
    classifier.batcher = batcher
    old = (app.state.classifier, app.state.runner, app.state.batcher)
    app.state.runner, app.state.batcher = runner, batcher
    app.state.classifier = classifier  # last: requests see the new models from here on
    app.state.models_error = app.state.reload_error = None
    return old


def _close_models(runner: object, batcher: MicroBatcher | None) -> None:
    if batcher is not None:
        batcher.close()
    if isinstance(runner, ModelProcess | HostRun):
        runner.close()


def retire_models(app: FastAPI, old: tuple, grace_s: float) -> None:
    """Close what served before, once the requests that still hold it are done (or at shutdown,
    whichever comes first)."""
    _, runner, batcher = old
    timer = threading.Timer(grace_s, _close_models, (runner, batcher))
    timer.daemon = True
    app.state.retiring = [r for r in app.state.retiring if r[0].is_alive()]  # done: forget
    app.state.retiring.append((timer, runner, batcher))
    timer.start()


def load_models(app: FastAPI) -> None:
    """Load the A/B models at start; on failure keep serving and say why in /readyz."""
    settings: Settings = app.state.settings
    app.state.classifier = app.state.runner = app.state.batcher = None
    app.state.models_error = app.state.reload_error = None
    app.state.failed_run = None
    app.state.host_down = False
    run_dir = find_run_dir(settings, app.state.sessions)
    if run_dir is None:
        app.state.models_error = (
            f"no trained models found in {settings.runs_dir}: run `maxmin-inspect train DATA`"
        )
        return
    try:
        install_models(app, *build_models(app, run_dir))
    except LOAD_ERRORS as exc:
        app.state.models_error = f"cannot load models from {run_dir}: {exc}"
        app.state.failed_run = _failed(run_dir, exc)
        app.state.host_down = isinstance(exc, ModelHostUnreachable)
        log.error(app.state.models_error)
        return
    _keep_serving(app, run_dir)


def _failed(run_dir: Path, exc: Exception) -> tuple[Path, float] | None:
    """What the follower remembers of a run that did not load, so as not to try it again before
    ``retry_s``; nothing when only the shared model process was down (being restarted): that is
    tried again within ``HOST_RETRY_S``."""
    if isinstance(exc, ModelHostUnreachable):
        return None
    return (Path(run_dir).resolve(), time.monotonic())


def _keep_serving(app: FastAPI, run_dir: Path) -> None:
    if app.state.settings.run_dir is not None:
        return  # pinned by the setting: no choice to record
    try:
        with app.state.sessions() as session:
            keep_serving(session, run_dir)
    except DBAPIError as exc:
        log.warning("could not record %s as the run served: %s", run_dir, exc)


def follow_served_run(app: FastAPI, retry_s: float = 60.0) -> bool:
    """Switch to the run the service should serve when it has changed (one chosen to serve, or a
    first run registered): load it beside the current models, then swap. A run that cannot be
    loaded leaves the current models serving, says why in /readyz, and is tried again after
    ``retry_s``. True when it switched."""
    with app.state.switching:  # one switch at a time; shutdown waits for one in progress
        if app.state.closing:
            return False
        return _follow_served_run(app, retry_s)


def _follow_served_run(app: FastAPI, retry_s: float) -> bool:
    settings: Settings = app.state.settings
    run_dir = find_run_dir(settings, app.state.sessions)
    if run_dir is None:
        return False
    run_dir = Path(run_dir).resolve()
    current = app.state.classifier
    if current is not None and current.run_dir.resolve() == run_dir:
        app.state.reload_error = app.state.failed_run = None  # e.g. a failed choice undone
        app.state.host_down = False
        return False
    failed = app.state.failed_run
    if failed is not None and failed[0] == run_dir and time.monotonic() - failed[1] < retry_s:
        return False
    try:
        classifier, runner = build_models(app, run_dir)
    except LOAD_ERRORS as exc:
        app.state.failed_run = _failed(run_dir, exc)
        app.state.host_down = isinstance(exc, ModelHostUnreachable)
        problem = f"cannot load models from {run_dir}: {exc}"
        log.error(problem)
        if current is None:
            app.state.models_error = problem
        else:
            app.state.reload_error = f"{problem}; still serving {current.run_dir}"
        return False
    old = install_models(app, classifier, runner)
    app.state.failed_run = None
    app.state.host_down = False
    retire_models(app, old, grace_s=settings.model_timeout_seconds)
    log.info("now serving the models of %s", run_dir)
    _keep_serving(app, run_dir)
    return True


# While the shared model process is being restarted, a worker whose models could not load because
# of that tries again this often, not only every MAXMIN_RELOAD_SECONDS: the new one is up within
# seconds, and until the worker has loaded, its requests get 503.
HOST_RETRY_S = 0.5


async def _follow(app: FastAPI, every_s: float) -> None:
    while True:
        await asyncio.sleep(min(every_s, HOST_RETRY_S) if app.state.host_down else every_s)
        try:
            await run_in_threadpool(follow_served_run, app)
        except Exception:  # noqa: BLE001 - keep following; the log says what went wrong
            log.exception("could not check which run to serve")


def _writer_in_process(settings: Settings) -> bool:
    """``MAXMIN_WRITER_PROCESS``: true, false, or auto (a process when the models run on CUDA)."""
    if settings.writer_process != "auto":
        return settings.writer_process == "true"
    from inspectlib.device import resolve_device

    try:
        return resolve_device(settings.device).type == "cuda"
    except ValueError:
        return False  # the models report the bad device


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # The web process's own torch work is tiny when the models run in their own process.
    torch.set_num_threads(1 if settings.model_process else settings.threads)
    engine = make_engine(settings.db_url)
    check_schema(engine)  # refuse an un-migrated database, naming the command to run
    app.state.engine = engine
    app.state.sessions = session_factory(engine)
    app.state.store = ImageStore(settings.images_dir, settings.image_sync)
    app.state.host = None
    app.state.retiring = []
    app.state.switching, app.state.closing = threading.Lock(), False
    # The writer process (when on) starts while the models load.
    if _writer_in_process(settings):
        writer = WriterProcess(
            settings.db_url,
            settings.images_dir,
            image_sync=settings.image_sync,
            wait=False,
            on_restart=app.state.metrics.writer_restarts.inc,
        )
    else:
        lock = write_lock(settings.db_url)
        writer = GroupWriter(app.state.sessions, app.state.store, write_lock=lock)
    try:
        load_models(app)
        if isinstance(writer, WriterProcess):
            writer.wait_ready()
    except BaseException:
        writer.close()
        raise
    app.state.writer = writer
    app.state.decode_pool = ThreadPoolExecutor(settings.core_share, thread_name_prefix="decode")
    follower = None
    # With MAXMIN_RUN_DIR set, the follower only loads that run again if it failed to load.
    if settings.reload_seconds > 0:
        follower = asyncio.create_task(_follow(app, settings.reload_seconds))
    # Everything loaded so far lives as long as the service: keep it out of the garbage
    # collector's full passes, which otherwise walk every object of torch, SQLAlchemy and FastAPI
    # and stall every request while they run (bench/gc_bench.py measures a pass).
    gc.collect()
    gc.freeze()
    yield
    if follower is not None:
        follower.cancel()
    with app.state.switching:  # a switch in progress ends first; none starts after
        app.state.closing = True
    for timer, runner, batcher in app.state.retiring:
        if timer.is_alive():  # not closed yet: close now, not at the end of its grace
            timer.cancel()
            _close_models(runner, batcher)
    _close_models(app.state.runner, app.state.batcher)
    if app.state.host is not None:
        app.state.host.close()
    app.state.writer.close()
    app.state.decode_pool.shutdown(wait=True)
    engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; settings default to the environment's."""
    app = FastAPI(
        title="maxmin-inspect",
        summary="A/B visual inspection: the plain CNN against the MaxMin CNN on your parts.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings or get_settings()
    app.add_middleware(BodyLimitMiddleware, max_bytes=app.state.settings.max_body_bytes)
    settings = app.state.settings
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings.data_dir, settings.session_secret),
        session_cookie="maxmin_session",
        max_age=12 * 3600,
        same_site="strict",
        https_only=settings.cookie_secure,
    )
    app.state.metrics = Metrics()
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    app.add_middleware(ObserveMiddleware)
    for module in (health, metrics, predictions, images, stats, reports, training, pages):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(OSError)
    async def _storage(_: Request, exc: OSError) -> JSONResponse:
        log.error("image storage error: %s", exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            detail = "image storage is full; free disk space under the data directory"
        else:
            detail = f"image storage unavailable: {exc.strerror or exc}"
        return JSONResponse({"detail": detail}, status_code=503)

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.error("database unavailable: %s", exc.orig)
        return JSONResponse({"detail": "database unavailable, try again shortly"}, status_code=503)

    return app
