"""Reading, filtering and labelling stored predictions; labels keep their history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.crud.errors import InvalidLabel, NotFound, as_utc, check_text
from app.tables import LabelEvent, ModelOutput, Prediction, utcnow


def get_prediction(session: Session, prediction_id: int) -> Prediction:
    pred = session.get(Prediction, prediction_id)
    if pred is None:
        raise NotFound(f"prediction {prediction_id} not found")
    return pred


def set_label(session: Session, prediction_id: int, label: str, who: str | None) -> Prediction:
    """Record an inspector's label; the previous ones stay in the history."""
    query = select(Prediction).where(Prediction.id == prediction_id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    pred = session.execute(query).scalar_one_or_none()
    if pred is None:
        raise NotFound(f"prediction {prediction_id} not found")
    if label not in pred.classes:
        raise InvalidLabel(f"label {label!r} is not one of the classes: {', '.join(pred.classes)}")
    now = utcnow()
    pred.label, pred.labelled_by, pred.labelled_at = label, who, now
    session.add(LabelEvent(prediction_id=pred.id, label=label, labelled_by=who, created_at=now))
    session.commit()
    session.refresh(pred)
    return pred


@dataclass
class PredictionFilter:
    since: datetime | None = None
    until: datetime | None = None
    source: str | None = None
    labelled: bool | None = None
    disagree: bool | None = None
    predicted: str | None = None
    decision: str | None = None  # accept, reject or review
    # Only predictions made by exactly these model versions (name -> version), when given.
    versions: dict[str, str] | None = None


def filtered_query(query: Select, f: PredictionFilter) -> Select:
    check_text(f.source, "source")
    check_text(f.predicted, "predicted")
    if f.since is not None:
        query = query.where(Prediction.created_at >= as_utc(f.since))
    if f.until is not None:
        query = query.where(Prediction.created_at < as_utc(f.until))
    if f.source is not None:
        query = query.where(Prediction.source == f.source)
    if f.labelled is not None:
        query = query.where(
            Prediction.label.is_not(None) if f.labelled else Prediction.label.is_(None)
        )
    if f.decision is not None:
        query = query.where(Prediction.decision == f.decision)
    if f.disagree is not None:
        query = query.where(Prediction.agree.is_(not f.disagree))
    if f.predicted is not None:
        hit = select(ModelOutput.prediction_id).where(ModelOutput.label == f.predicted)
        query = query.where(Prediction.id.in_(hit))
    for name, version in (f.versions or {}).items():
        made = select(ModelOutput.prediction_id).where(
            ModelOutput.model_name == name, ModelOutput.model_version == version
        )
        query = query.where(Prediction.id.in_(made))
    return query


def list_predictions(
    session: Session, f: PredictionFilter, skip: int, limit: int, oldest_first: bool = False
) -> tuple[list[Prediction], int]:
    """Newest first (the review queue: oldest first), with the total count that matches."""
    count = session.execute(filtered_query(select(func.count(Prediction.id)), f)).scalar_one()
    query = (
        filtered_query(select(Prediction), f)
        .order_by(Prediction.id.asc() if oldest_first else Prediction.id.desc())
        .offset(skip)
        .limit(limit)
    )
    return list(session.execute(query).scalars()), count
