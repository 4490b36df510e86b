"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.core.model_host import HostRun
from app.core.model_process import ModelProcess
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def read_health() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def read_ready(request: Request) -> JSONResponse:
    """Ready when the database answers and the A/B models are loaded and, when they run in a
    process of their own (this worker's, or one shared by all workers), that it is up; else 503
    with the reason."""
    state = request.app.state
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        body = Health(status="unavailable", detail=f"database unreachable: {exc.orig}")
        return JSONResponse(body.model_dump(), status_code=503)
    if state.classifier is None:
        body = Health(status="unavailable", detail=state.models_error)
        # Only the shared model process being restarted passes in moments.
        retry = {"Retry-After": "1"} if getattr(state, "host_down", False) else None
        return JSONResponse(body.model_dump(), status_code=503, headers=retry)
    if isinstance(state.runner, HostRun | ModelProcess) and (problem := state.runner.ping()):
        # Down or hung: the serve command (shared) or the worker's watchdog is replacing it.
        body = Health(status="unavailable", detail=problem)
        return JSONResponse(body.model_dump(), status_code=503)
    c = state.classifier
    body = Health(
        status="ok",
        models={n: m.version for n, m in c.models.items()},
        run=str(c.run_dir),
        detail=state.reload_error,  # a run chosen to serve that could not be loaded
    )
    return JSONResponse(body.model_dump())
