"""Typed dependencies shared by the routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.inference import ServedRun
from app.core.security import Principal, require
from app.core.storage import ImageStore


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


# These dependencies only read the app's state: ``async def`` keeps them on the event loop, where a
# plain ``def`` would send each of them through the thread pool on every request.
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> ImageStore:
    return request.app.state.store


async def get_classifier(request: Request) -> ServedRun:
    classifier = request.app.state.models.classifier
    if classifier is None:
        # Only the shared model process being restarted passes in moments: say when to retry.
        transient = request.app.state.models.host_down
        raise HTTPException(
            503,
            detail=request.app.state.models.models_error or "models not loaded",
            headers={"Retry-After": "1"} if transient else None,
        )
    return classifier


SessionDep = Annotated[Session, Depends(get_db)]
LineDep = Annotated[Principal, Depends(require("line"))]
InspectorDep = Annotated[Principal, Depends(require("inspector"))]
ManagerDep = Annotated[Principal, Depends(require("manager"))]
AdminDep = Annotated[Principal, Depends(require("admin"))]
# Ids are 32-bit integer columns; larger numbers are a 422 here, not a database error later.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[ImageStore, Depends(get_store)]
ClassifierDep = Annotated[ServedRun, Depends(get_classifier)]
