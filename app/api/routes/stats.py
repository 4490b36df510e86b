"""The live A/B from inspectors' labels."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException

from app.api.deps import ClassifierDep, ManagerDep, SessionDep, SettingsDep
from app.crud import InvalidFilter, compute_stats
from app.schemas import StatsPublic

router = APIRouter(tags=["stats"])


@router.get("/stats", response_model=StatsPublic)
def read_stats(
    _: ManagerDep,
    session: SessionDep,
    settings: SettingsDep,
    classifier: ClassifierDep,
    since: datetime | None = None,
    until: datetime | None = None,
) -> StatsPublic:
    """Per-model accuracy (95% Wilson interval), paired comparison (McNemar), confusion, latency."""
    names = list(classifier.models)
    try:
        return StatsPublic(**compute_stats(session, since, until, names, classifier.classes))
    except InvalidFilter as exc:
        raise HTTPException(422, detail=str(exc)) from None
