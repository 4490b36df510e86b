"""The write path: each group of waiting requests' images and predictions in one transaction."""

from __future__ import annotations

import functools
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Insert, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.core.storage import ImageStore
from app.tables import ModelOutput, Prediction, ShadowPrediction, StoredImage, utcnow
from inspectlib.decision import Decision


@dataclass
class NewImage:
    sha256: str
    data: bytes
    content_type: str
    width: int
    height: int
    filename: str | None


@dataclass
class NewOutput:
    model_name: str
    model_version: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    latency_ms: float


@dataclass
class NewShadow:
    """The challenger run's answer for one image: per model its label and confidence, and the
    decision under the challenger's own operating point."""

    run_id: int
    decision: str
    labels: dict[str, str]
    confidences: dict[str, float]
    versions: dict[str, str]


@dataclass
class StoredPrediction:
    """What the API answers for a prediction just written (no ORM object: built in bulk)."""

    id: int
    image_sha256: str
    created_at: datetime
    source: str | None
    part_id: str | None
    filename: str | None
    agree: bool
    outputs: list[NewOutput]
    label: str | None = None
    labelled_by: str | None = None
    labelled_at: datetime | None = None
    history: list = field(default_factory=list)
    decision: str | None = None
    decision_reason: str | None = None


@functools.cache
def _group_statements(dialect: str) -> tuple[Insert, Insert, Insert, Insert]:
    """The statements of a group commit, built once per dialect: images (INSERT ... ON
    CONFLICT DO NOTHING, so that concurrent uploads of one image both succeed), predictions
    (returning their ids in the rows' order), model outputs and shadow answers. Rows go as
    parameters (compiled once, cached), not as inline VALUES."""
    module = postgresql if dialect == "postgresql" else sqlite
    table = Prediction.__table__
    return (
        module.insert(StoredImage.__table__).on_conflict_do_nothing(),
        insert(table).returning(table.c.id, sort_by_parameter_order=True),
        insert(ModelOutput.__table__),
        insert(ShadowPrediction.__table__),
    )


@dataclass
class WriteTiming:
    """Where one group commit's time went, in seconds: writing and syncing its new image files
    (and preparing its rows and connection), waiting for the write lock, and the statements with
    the commit."""

    files: float = 0.0
    lock: float = 0.0
    sql: float = 0.0


@dataclass
class PredictionBatch:
    """One request's images and model answers, to be stored all or nothing."""

    items: list[tuple[NewImage, list[NewOutput]]]
    classes: list[str]
    source: str | None
    part_id: str | None
    decisions: list[Decision] | None = None  # one per item, when the service decided
    shadow: list[NewShadow] | None = None  # one per item, when a challenger answered in shadow


def _stage(
    session: Session,
    store: ImageStore,
    batches: list[PredictionBatch],
    created: list[str],
    lock: AbstractContextManager,
    timing: WriteTiming,
) -> list[list[StoredPrediction]]:
    """Write the image files (once each), then, holding ``lock``, insert every batch's rows and
    commit.

    Three statements for the whole group (images, predictions, model outputs), whatever its size:
    per-object ORM flushes, and then per-request statements, were the largest part of a request's
    time after the models. Files and rows are prepared before the lock is taken, so the lock
    covers only the database's own work."""
    images: dict[str, dict] = {}
    pred_rows: list[dict] = []
    outputs: list[list[NewOutput]] = []
    shadows: list[NewShadow | None] = []
    now = utcnow()
    t0 = time.perf_counter()
    # Core statements on the session's connection: the ORM's execution and bulk paths add per-row
    # bookkeeping that the response does not need. Taking the connection begins no transaction
    # in the database yet, so it is done before the lock.
    conn = session.connection()
    put_images, put_predictions, put_outputs, put_shadow = _group_statements(conn.dialect.name)
    store.put_many({i.sha256: i.data for b in batches for i, _ in b.items}, created)
    for batch in batches:
        for i, (image, outs) in enumerate(batch.items):
            decision = batch.decisions[i] if batch.decisions else None
            images.setdefault(
                image.sha256,
                {
                    "sha256": image.sha256,
                    "content_type": image.content_type,
                    "size_bytes": len(image.data),
                    "width": image.width,
                    "height": image.height,
                    "created_at": now,
                },
            )
            pred_rows.append(
                {
                    "image_sha256": image.sha256,
                    "source": batch.source,
                    "part_id": batch.part_id,
                    "filename": image.filename,
                    "classes": batch.classes,
                    "agree": len({o.label for o in outs}) == 1,
                    "created_at": now,
                    "decision": decision.action if decision else None,
                    "decision_reason": decision.reason[:300] if decision else None,
                }
            )
            outputs.append(outs)
            shadows.append(batch.shadow[i] if batch.shadow else None)
    t1 = time.perf_counter()
    with lock:
        t2 = time.perf_counter()
        conn.execute(put_images, list(images.values()))
        ids = conn.execute(put_predictions, pred_rows).scalars().all()
        conn.execute(
            put_outputs,
            [
                {"prediction_id": pid, **o.__dict__}
                for pid, outs in zip(ids, outputs, strict=True)
                for o in outs
            ],
        )
        shadow_rows = [
            {"prediction_id": pid, "created_at": now, **sh.__dict__}
            for pid, sh in zip(ids, shadows, strict=True)
            if sh is not None
        ]
        if shadow_rows:
            conn.execute(put_shadow, shadow_rows)
        session.commit()
    t3 = time.perf_counter()
    timing.files, timing.lock, timing.sql = t1 - t0, t2 - t1, t3 - t2
    staged: list[list[StoredPrediction]] = []
    k = 0
    for batch in batches:
        preds = []
        for _ in batch.items:
            row = pred_rows[k]
            preds.append(
                StoredPrediction(
                    id=ids[k],
                    image_sha256=row["image_sha256"],
                    created_at=now,
                    source=row["source"],
                    part_id=row["part_id"],
                    filename=row["filename"],
                    agree=row["agree"],
                    outputs=outputs[k],
                    decision=row["decision"],
                    decision_reason=row["decision_reason"],
                )
            )
            k += 1
        staged.append(preds)
    return staged


def store_batches(
    session: Session,
    store: ImageStore,
    batches: list[PredictionBatch],
    lock: AbstractContextManager | None = None,
    timing: WriteTiming | None = None,
) -> list[list[StoredPrediction]]:
    """Store several requests' predictions in one transaction (a group commit); all or nothing.

    Image files are written before the commit; if the transaction fails, files this call created
    and that no committed row refers to are removed again, so no orphan files stay behind.
    ``lock`` is held around the statements and the commit (see ``app.core.db.write_lock``);
    ``timing``, when given, receives where the time went.
    """
    created: list[str] = []
    try:
        return _stage(
            session, store, batches, created, lock or nullcontext(), timing or WriteTiming()
        )
    except BaseException:
        session.rollback()
        for sha in created:
            try:
                still_used = session.get(StoredImage, sha) is not None
            except Exception:  # noqa: BLE001 - database gone: the file is not referenced
                still_used = False
            if not still_used:
                store.remove(sha)
        raise


def store_predictions(
    session: Session, store: ImageStore, batch: PredictionBatch
) -> list[StoredPrediction]:
    """One request's predictions in their own transaction."""
    return store_batches(session, store, [batch])[0]
