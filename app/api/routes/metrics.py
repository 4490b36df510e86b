"""Prometheus metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from app.api.deps import ManagerDep

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
def read_metrics(_: ManagerDep, request: Request) -> Response:
    """Requests, latency histograms (HTTP and per model), predictions per class, errors.

    With several workers (`serve --workers N`), every worker's counts, summed."""
    registry = request.app.state.metrics.registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
