"""The stored part images, by content hash."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from fastapi.responses import FileResponse

from app.api.deps import InspectorDep, SessionDep, StoreDep
from app.tables import StoredImage

router = APIRouter(tags=["images"])


@router.get(
    "/images/{sha256}",
    response_class=FileResponse,
    responses={404: {"description": "no such image"}},
)
def read_image(
    _: InspectorDep,
    sha256: Annotated[str, Path(pattern="^[0-9a-f]{64}$")],
    session: SessionDep,
    store: StoreDep,
) -> FileResponse:
    """The image bytes as uploaded."""
    row = session.get(StoredImage, sha256)
    if row is None or not store.exists(sha256):
        raise HTTPException(404, detail=f"image {sha256} not found")
    return FileResponse(
        store.path(sha256),
        media_type=row.content_type,
        headers={"Cache-Control": "private, max-age=86400, immutable"},
    )
