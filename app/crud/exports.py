"""Labelled parts as training data: what inspectors confirmed or corrected, one row per image."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crud.errors import as_utc, check_text
from app.tables import Prediction, StoredImage


@dataclass
class LabelledImage:
    sha256: str
    content_type: str
    label: str
    labelled_by: str | None
    labelled_at: datetime | None
    prediction_id: int
    source: str | None
    part_id: str | None
    model_versions: dict[str, str]  # which models classified it: the run it came from


def labelled_images(
    session: Session, since: datetime | None = None, source: str | None = None
) -> list[LabelledImage]:
    """Every labelled image once: when the same image was uploaded and labelled more than once,
    the latest label wins (a prediction's own label is already its latest correction)."""
    check_text(source, "source")
    query = (
        select(Prediction, StoredImage.content_type)
        .join(StoredImage, StoredImage.sha256 == Prediction.image_sha256)
        .where(Prediction.label.is_not(None))
        .order_by(Prediction.labelled_at, Prediction.id)
    )
    if since is not None:
        query = query.where(Prediction.labelled_at >= as_utc(since))
    if source is not None:
        query = query.where(Prediction.source == source)
    latest: dict[str, LabelledImage] = {}
    for pred, ctype in session.execute(query).all():
        latest[pred.image_sha256] = LabelledImage(
            sha256=pred.image_sha256,
            content_type=ctype,
            label=pred.label,
            labelled_by=pred.labelled_by,
            labelled_at=as_utc(pred.labelled_at),
            prediction_id=pred.id,
            source=pred.source,
            part_id=pred.part_id,
            model_versions={o.model_name: o.model_version for o in pred.outputs},
        )
    return sorted(latest.values(), key=lambda r: r.prediction_id)
