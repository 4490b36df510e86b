"""Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import ManagerDep

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
def read_metrics(_: ManagerDep, request: Request) -> Response:
    """Requests, latency histograms (HTTP and per model), predictions per class, errors."""
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
