"""The FastAPI app factory and its lifespan: database check, image store, A/B models."""

from __future__ import annotations

import asyncio
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
from sqlalchemy.exc import OperationalError
from starlette.middleware.sessions import SessionMiddleware

from app.api.routes import (
    health,
    images,
    metrics,
    pages,
    predictions,
    reports,
    runs,
    stats,
    training,
)
from app.core.config import Settings, get_settings
from app.core.db import check_schema, make_engine, session_factory, write_lock
from app.core.headers import SecurityHeadersMiddleware
from app.core.limits import BodyLimitMiddleware, PixelBudget
from app.core.observability import Metrics, ObserveMiddleware
from app.core.security import KeyCache, session_secret
from app.core.serving import ServedModels
from app.core.writer import GroupWriter, WriterProcess

log = logging.getLogger("maxmin_inspect")
HERE = Path(__file__).resolve().parent


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
    app.state.store = settings.open_store()
    models = ServedModels(
        settings, app.state.sessions, app.state.metrics.model_restarts.labels("worker").inc
    )
    app.state.models = models
    # The challenger run's models, in shadow (nothing loaded while there is no challenger).
    shadow = ServedModels(
        settings,
        app.state.sessions,
        app.state.metrics.model_restarts.labels("shadow").inc,
        role="challenger",
    )
    app.state.shadow = shadow
    # The writer process (when on) starts while the models load.
    if _writer_in_process(settings):
        writer = WriterProcess(
            settings.db_url,
            settings.images_dir,
            image_sync=settings.image_sync,
            image_store=(settings.image_store, settings.s3_endpoint_url),
            wait=False,
            on_restart=app.state.metrics.writer_restarts.inc,
        )
    else:
        lock = write_lock(settings.db_url)
        writer = GroupWriter(app.state.sessions, app.state.store, write_lock=lock)
    try:
        models.load()
        shadow.load()
        if isinstance(writer, WriterProcess):
            writer.wait_ready()
    except BaseException:
        writer.close()
        shadow.close()
        models.close()
        raise
    app.state.writer = writer
    app.state.decode_pool = ThreadPoolExecutor(settings.core_share, thread_name_prefix="decode")
    app.state.decode_budget = PixelBudget(settings.decode_budget_pixels)
    followers = []
    # With MAXMIN_RUN_DIR set, the follower only loads that run again if it failed to load.
    if settings.reload_seconds > 0:
        followers = [
            asyncio.create_task(served.follow_forever(settings.reload_seconds))
            for served in (models, shadow)
        ]
    # Everything loaded so far lives as long as the service: keep it out of the garbage
    # collector's full passes, which otherwise walk every object of torch, SQLAlchemy and FastAPI
    # and stall every request while they run (bench/gc_bench.py measures a pass).
    gc.collect()
    gc.freeze()
    yield
    for follower in followers:
        follower.cancel()
    shadow.close()
    models.close()
    app.state.writer.close()
    app.state.decode_pool.shutdown(wait=True)
    engine.dispose()


def _add_docs(app: FastAPI) -> None:
    """/docs: Swagger UI from files a package ships (no CDN, nothing fetched at run time), its one
    inline script allowed by the response's nonce."""
    import fastapi_offline
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse

    assets = Path(fastapi_offline.__file__).resolve().parent / "static"
    app.mount("/docs-static", StaticFiles(directory=assets), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} API",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/docs-static/favicon.png",
        )
        html = page.body.decode().replace("<script>", f'<script nonce="{request.state.csp_nonce}">')
        return HTMLResponse(html)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; settings default to the environment's."""
    app = FastAPI(
        title="maxmin-inspect",
        summary="A/B visual inspection: the plain CNN against the MaxMin CNN on your parts.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served below from local files, or not at all (MAXMIN_API_DOCS)
        redoc_url=None,
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
    app.add_middleware(SecurityHeadersMiddleware)
    for module in (health, metrics, predictions, images, stats, reports, runs, training, pages):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    if settings.api_docs:
        _add_docs(app)

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
