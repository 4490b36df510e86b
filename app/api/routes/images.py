"""The stored part images, by content hash."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from fastapi.responses import FileResponse, Response

from app.api.deps import InspectorDep, SessionDep, StoreDep
from app.tables import StoredImage

router = APIRouter(tags=["images"])


@router.get(
    "/images/{sha256}",
    response_class=Response,
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
    headers = {"Cache-Control": "private, max-age=86400, immutable"}
    path = store.local_path(sha256) if row is not None else None
    if path is not None:
        return FileResponse(path, media_type=row.content_type, headers=headers)
    data = store.read(sha256) if row is not None else None
    if data is None:
        raise HTTPException(404, detail=f"image {sha256} not found")
    return Response(data, media_type=row.content_type, headers=headers)
