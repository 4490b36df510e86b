"""Liveness and readiness."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from app.core.model_host import HostRun
from app.core.model_process import ModelProcess
from app.core.remote import RemoteModels
from app.core.security import identify, may
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def read_health() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def read_ready(request: Request) -> JSONResponse:
    """Ready when the database answers and the A/B models are loaded and, when they run in a
    process of their own (this worker's, or one shared by all workers), that it is up; else 503.
    The reason, the run and the model versions are shown to managers and above; anyone else (a
    load balancer) gets the status only."""
    answer = await run_in_threadpool(_readiness, request)
    if not may(await identify(request), "manager"):
        body = {"status": answer.body["status"]}
        return JSONResponse(body, status_code=answer.status_code, headers=answer.retry)
    return JSONResponse(answer.body, status_code=answer.status_code, headers=answer.retry)


@dataclass
class _Answer:
    body: dict
    status_code: int = 200
    retry: dict | None = None


def _readiness(request: Request) -> _Answer:
    state = request.app.state
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        body = Health(status="unavailable", detail=f"database unreachable: {exc.orig}")
        return _Answer(body.model_dump(), 503)
    if state.models.classifier is None:
        body = Health(status="unavailable", detail=state.models.models_error)
        # Only the shared model process being restarted passes in moments.
        retry = {"Retry-After": "1"} if state.models.host_down else None
        return _Answer(body.model_dump(), 503, retry)
    if isinstance(state.models.runner, HostRun | ModelProcess | RemoteModels) and (
        problem := state.models.runner.ping()
    ):
        # Down or hung: the serve command (shared) or the worker's watchdog is replacing it.
        body = Health(status="unavailable", detail=problem)
        return _Answer(body.model_dump(), 503)
    c = state.models.classifier
    body = Health(
        status="ok",
        models={n: m.version for n, m in c.models.items()},
        run=str(c.run_dir),
        form=f"{c.runtime} {c.form}",
        detail=state.models.reload_error,  # a run chosen to serve that could not be loaded
    )
    return _Answer(body.model_dump())
