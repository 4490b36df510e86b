"""The live A/B from inspectors' labels."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, HTTPException, Query

from app.api.deps import ClassifierDep, ManagerDep, SessionDep, SettingsDep
from app.crud.errors import InvalidFilter
from app.crud.live_ab import compute_stats, decision_stats, served_versions
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
    scope: Literal["served", "all"] = Query(
        "served",
        description="`served`: only images the served model versions classified (the default; "
        "after a retrain the old models' answers are left out); `all`: every version",
    ),
) -> StatsPublic:
    """Per-model accuracy (95% Wilson interval), paired comparison (McNemar), confusion, latency."""
    names = list(classifier.models)
    versions = served_versions(classifier) if scope == "served" else None
    try:
        return StatsPublic(
            **compute_stats(session, since, until, names, classifier.classes, versions),
            decisions=decision_stats(session, since, until, versions, classifier.good_class),
        )
    except InvalidFilter as exc:
        raise HTTPException(422, detail=str(exc)) from None
