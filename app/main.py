"""The FastAPI app factory and its lifespan: database check, image store, A/B models."""

from __future__ import annotations

import errno
import gc
import logging
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
from app.core.inference import Classifier, ModelsUnavailable
from app.core.limits import BodyLimitMiddleware
from app.core.model_host import ModelHostClient
from app.core.model_process import ModelProcess, ModelProcessFailed
from app.core.observability import Metrics, ObserveMiddleware
from app.core.security import KeyCache, session_secret
from app.core.storage import ImageStore
from app.core.writer import GroupWriter
from app.crud import latest_run
from training.checkpoint import CheckpointError

log = logging.getLogger("maxmin_inspect")
HERE = Path(__file__).resolve().parent


def find_run_dir(settings: Settings, sessions) -> Path | None:  # noqa: ANN001
    """The run to serve: the setting, else the newest registered run, else the newest on disk."""
    if settings.run_dir is not None:
        return settings.run_dir
    try:
        with sessions() as session:
            run = latest_run(session)
        if run is not None and Path(run.run_dir).is_dir():
            return Path(run.run_dir)
    except DBAPIError:
        pass
    found = sorted(settings.runs_dir.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def load_models(app: FastAPI) -> None:
    """(Re)load the A/B models; on failure keep serving and say why in /readyz."""
    settings: Settings = app.state.settings
    run_dir = find_run_dir(settings, app.state.sessions)
    app.state.classifier, app.state.models_error = None, None
    if run_dir is None:
        app.state.models_error = (
            f"no trained models found in {settings.runs_dir}: run `maxmin-inspect train DATA`"
        )
        return
    try:
        if settings.model_host:
            # `serve` with several workers: the models run once, in the host it started.
            host = ModelHostClient(
                settings.model_host,
                bytes.fromhex(settings.model_host_key or ""),
                settings.model_timeout_seconds,
            )
            app.state.runner = host
            run_dir = host.run_dir
            app.state.classifier = Classifier(run_dir, settings.ab_models, "cpu")
            return
        # With a model process, this copy only decodes and names things: it stays on the CPU.
        device = "cpu" if settings.model_process else settings.device
        app.state.classifier = Classifier(run_dir, settings.ab_models, device)
        app.state.runner = app.state.classifier
        if settings.model_process:
            app.state.runner = ModelProcess(
                run_dir,
                settings.ab_models,
                settings.device,
                settings.threads,
                batch_timeout_s=settings.model_timeout_seconds,
                on_restart=app.state.metrics.model_restarts.labels("worker").inc,
            )
    except (ModelsUnavailable, ModelProcessFailed, CheckpointError, ValueError, OSError) as exc:
        app.state.classifier = None
        app.state.models_error = f"cannot load models from {run_dir}: {exc}"
        log.error(app.state.models_error)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # The web process's own torch work is tiny when the models run in their own process.
    torch.set_num_threads(1 if settings.model_process else settings.threads)
    engine = make_engine(settings.db_url)
    check_schema(engine)  # refuse an un-migrated database, naming the command to run
    app.state.engine = engine
    app.state.sessions = session_factory(engine)
    app.state.store = ImageStore(settings.images_dir)
    load_models(app)
    app.state.writer = GroupWriter(
        app.state.sessions, app.state.store, write_lock=write_lock(settings.db_url)
    )
    app.state.decode_pool = ThreadPoolExecutor(settings.core_share, thread_name_prefix="decode")
    app.state.batcher = None
    if app.state.classifier is not None:
        app.state.batcher = MicroBatcher(
            app.state.runner,
            settings.batch_max_size,
            settings.batch_wait_ms,
            settings.queue_max,
        )
    # Everything loaded so far lives as long as the service: keep it out of the garbage
    # collector's full passes, which otherwise walk every object of torch, SQLAlchemy and FastAPI
    # (bench/gc_bench.py: about 190 ms per full pass on a 2-core CPU, stalling every request).
    gc.collect()
    gc.freeze()
    yield
    if app.state.batcher is not None:
        app.state.batcher.close()
    if isinstance(getattr(app.state, "runner", None), ModelProcess | ModelHostClient):
        app.state.runner.close()
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
