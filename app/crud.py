"""Database operations: store predictions with their images, labels with history, stats, runs."""

from __future__ import annotations

import functools
import json
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import Insert, Select, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.core.storage import ImageStore
from app.tables import LabelEvent, ModelOutput, Prediction, Run, StoredImage, utcnow


class NotFound(LookupError):
    """The named row does not exist."""


class InvalidLabel(ValueError):
    """A label that is not one of the prediction's classes."""


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


class InvalidFilter(ValueError):
    """A filter value the database cannot hold (a date out of range, a NUL character)."""


def as_utc(value: datetime | None) -> datetime | None:
    """Aware UTC datetimes everywhere (SQLite hands back naive ones)."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise InvalidFilter(f"date {value.isoformat()} is out of range in UTC") from None


def check_text(value: str | None, name: str) -> str | None:
    """Text that PostgreSQL can store: no NUL characters."""
    if value is not None and "\x00" in value:
        raise InvalidFilter(f"'{name}' contains a NUL character")
    return value


@functools.cache
def _group_statements(dialect: str) -> tuple[Insert, Insert, Insert]:
    """The three statements of a group commit, built once per dialect: images (INSERT ... ON
    CONFLICT DO NOTHING, so that concurrent uploads of one image both succeed), predictions
    (returning their ids in the rows' order) and model outputs. Rows go as parameters (compiled
    once, cached), not as inline VALUES."""
    module = postgresql if dialect == "postgresql" else sqlite
    table = Prediction.__table__
    return (
        module.insert(StoredImage.__table__).on_conflict_do_nothing(),
        insert(table).returning(table.c.id, sort_by_parameter_order=True),
        insert(ModelOutput.__table__),
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
    now = utcnow()
    t0 = time.perf_counter()
    # Core statements on the session's connection: the ORM's execution and bulk paths add per-row
    # bookkeeping that the response does not need. Taking the connection begins no transaction
    # in the database yet, so it is done before the lock.
    conn = session.connection()
    put_images, put_predictions, put_outputs = _group_statements(conn.dialect.name)
    store.put_many({i.sha256: i.data for b in batches for i, _ in b.items}, created)
    for batch in batches:
        for image, outs in batch.items:
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
                }
            )
            outputs.append(outs)
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
    # Only predictions made by exactly these model versions (name -> version), when given.
    versions: dict[str, str] | None = None


def _filtered(query: Select, f: PredictionFilter) -> Select:
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
    session: Session, f: PredictionFilter, skip: int, limit: int
) -> tuple[list[Prediction], int]:
    """Newest first, with the total count that matches the filters."""
    count = session.execute(_filtered(select(func.count(Prediction.id)), f)).scalar_one()
    query = (
        _filtered(select(Prediction), f).order_by(Prediction.id.desc()).offset(skip).limit(limit)
    )
    return list(session.execute(query).scalars()), count


def _wilson(correct: int, n: int) -> dict[str, float | None]:
    if n == 0:
        return {"value": None, "low": None, "high": None}
    from scipy import stats as sps  # here: the database writer process never needs it

    ci = sps.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return {"value": correct / n, "low": float(ci.low), "high": float(ci.high)}


def served_versions(classifier) -> dict[str, str]:  # noqa: ANN001 - a Classifier
    """Model name -> the version being served, as stored with each prediction."""
    return {name: m.version for name, m in classifier.models.items()}


def compute_stats(
    session: Session,
    since: datetime | None,
    until: datetime | None,
    models: list[str],
    classes: list[str],
    versions: dict[str, str] | None = None,
) -> dict:
    """Live A/B from inspectors' labels: accuracy with intervals, paired test, confusion.

    With ``versions`` (the served models' versions), only the images those exact models
    classified count: after a retrain the old models' answers would otherwise be mixed into the
    new models' accuracy. How many labelled images that leaves out is reported."""
    f = PredictionFilter(since=since, until=until, versions=versions)
    other_labelled = 0
    if versions:
        every = PredictionFilter(since=since, until=until, labelled=True)
        other_labelled = session.execute(
            _filtered(select(func.count(Prediction.id)), every)
        ).scalar_one()
    total = session.execute(_filtered(select(func.count(Prediction.id)), f)).scalar_one()
    agree = session.execute(
        _filtered(select(func.count(Prediction.id)), f).where(Prediction.agree.is_(True))
    ).scalar_one()
    labelled_rows = session.execute(
        _filtered(select(Prediction.id, Prediction.label), f).where(Prediction.label.is_not(None))
    ).all()
    truth = {pid: label for pid, label in labelled_rows}
    outputs = session.execute(
        _filtered(
            select(
                ModelOutput.prediction_id,
                ModelOutput.model_name,
                ModelOutput.label,
                ModelOutput.latency_ms,
            ).join(Prediction, Prediction.id == ModelOutput.prediction_id),
            f,
        )
    ).all()
    index = {c: i for i, c in enumerate(classes)}
    per_model: dict[str, dict] = {}
    correct_by_model: dict[str, dict[int, bool]] = {m: {} for m in models}
    latencies: dict[str, list[float]] = {m: [] for m in models}
    matrices = {m: np.zeros((len(classes), len(classes)), dtype=int) for m in models}
    for pid, name, label, latency in outputs:
        if name not in correct_by_model:
            continue
        latencies[name].append(latency)
        if pid in truth:
            correct_by_model[name][pid] = label == truth[pid]
            if truth[pid] in index and label in index:
                matrices[name][index[truth[pid]], index[label]] += 1
    for name in models:
        hits = correct_by_model[name]
        lat = np.asarray(latencies[name])
        per_model[name] = {
            "accuracy": _wilson(sum(hits.values()), len(hits)),
            "correct": int(sum(hits.values())),
            "labelled": len(hits),
            "confusion_matrix": matrices[name].tolist(),
            "latency_ms_p50": float(np.percentile(lat, 50)) if lat.size else None,
            "latency_ms_p95": float(np.percentile(lat, 95)) if lat.size else None,
        }
    paired = None
    if len(models) >= 2:
        a, b = models[0], models[1]
        common = sorted(set(correct_by_model[a]) & set(correct_by_model[b]))
        ca = np.array([correct_by_model[a][p] for p in common], dtype=bool)
        cb = np.array([correct_by_model[b][p] for p in common], dtype=bool)
        from inspectlib.stats import mcnemar

        test = mcnemar(cb, ca)  # "model" = b (the challenger), "baseline" = a
        n = len(common)
        only_b, only_a = test["only_model_correct"], test["only_baseline_correct"]
        if n:
            diff = (only_b - only_a) / n
            se = math.sqrt(max(only_a + only_b - (only_b - only_a) ** 2 / n, 0.0)) / n
            interval = {
                "value": diff,
                "low": max(diff - 1.96 * se, -1.0),
                "high": min(diff + 1.96 * se, 1.0),
            }
        else:
            interval = {"value": None, "low": None, "high": None}
        paired = {
            "model_a": a,
            "model_b": b,
            "accuracy_difference": interval,
            "only_a_correct": only_a,
            "only_b_correct": only_b,
            "mcnemar_p_value": test["p_value"],
        }
    return {
        "since": as_utc(since),
        "until": as_utc(until),
        "classes": classes,
        "predictions": total,
        "labelled": len(truth),
        "unlabelled": total - len(truth),
        "agreement_rate": agree / total if total else None,
        "versions": versions,
        "labelled_other_versions": other_labelled - len(truth) if versions else 0,
        "models": per_model,
        "paired": paired,
    }


def register_run(session: Session, run_dir: Path) -> Run:
    """Record a finished training run (its report and model versions); re-registering updates it."""
    run_dir = Path(run_dir).resolve()
    src = run_dir / "report.json"
    if not src.is_file():
        raise NotFound(f"{src} not found: is {run_dir} a run directory written by `train`?")
    try:
        report = json.loads(src.read_text())
        versions = {}
        for name, m in report["models"].items():
            ckpt = m.get("checkpoint")
            sha = next((c["weights_sha256"] for c in m["checkpoints"] if c["path"] == ckpt), "")
            versions[name] = f"{Path(ckpt).name}:{sha[:12]}" if ckpt else "none"
        created = datetime.fromisoformat(report["created_at"])
        fingerprint, verdict = report["dataset"]["fingerprint"], report["verdict"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{src} is not a PoC report this version understands: {exc}") from None
    run = session.execute(select(Run).where(Run.run_dir == str(run_dir))).scalar_one_or_none()
    if run is None:
        run = Run(run_dir=str(run_dir))
        session.add(run)
    run.created_at = created
    run.data_fingerprint = fingerprint
    run.verdict = verdict
    run.model_versions = versions
    run.report = report
    run.registered_at = utcnow()
    session.commit()
    return run


def list_runs(session: Session, limit: int | None = None) -> list[Run]:
    """Registered runs, newest first."""
    query = select(Run).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)
    return list(session.execute(query).scalars())


def latest_run(session: Session) -> Run | None:
    runs = list_runs(session, limit=1)
    return runs[0] if runs else None


def serving_run(session: Session) -> Run | None:
    """The run the service serves: the one most recently chosen to serve; before any choice, the
    newest registered (which the service then records as chosen, see ``keep_serving``)."""
    query = select(Run).order_by(
        Run.served_at.is_(None), Run.served_at.desc(), Run.registered_at.desc(), Run.id.desc()
    )
    return session.execute(query.limit(1)).scalars().first()


def choose_to_serve(session: Session, run: Run) -> Run:
    """Make ``run`` the one the service serves; every worker switches to it within seconds."""
    run.served_at = utcnow()
    session.commit()
    return run


def keep_serving(session: Session, run_dir: Path) -> None:
    """Record the run served by default (no run chosen yet) as chosen, so that a run registered
    later, say a quick experiment, does not replace it until someone chooses it."""
    if session.execute(select(Run.id).where(Run.served_at.is_not(None)).limit(1)).first():
        return
    run = session.execute(
        select(Run).where(Run.run_dir == str(Path(run_dir).resolve()))
    ).scalar_one_or_none()
    if run is not None:
        choose_to_serve(session, run)
