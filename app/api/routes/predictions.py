"""POST /predict (A/B classification) and the stored predictions with inspectors' labels."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from app.api.deps import (
    ClassifierDep,
    InspectorDep,
    LineDep,
    RowId,
    SessionDep,
    SettingsDep,
)
from app.core.batcher import BatchResult, Overloaded
from app.core.config import Settings
from app.core.inference import Decoded, ServedRun
from app.core.limits import PixelBudget
from app.core.model_process import ModelProcessFailed
from app.core.writer import WriterUnavailable
from app.crud.errors import InvalidFilter, InvalidLabel, NotFound, as_utc
from app.crud.predictions import PredictionFilter, get_prediction, list_predictions, set_label
from app.crud.writes import NewImage, NewOutput, NewShadow, PredictionBatch, StoredPrediction
from app.schemas import LabelUpdate, PredictionPublic, PredictionsPublic
from app.tables import Prediction
from inspectlib.decision import decide
from inspectlib.imaging import ImageError, ImageTooLarge, UnsupportedFormat

router = APIRouter(tags=["predictions"])
log = logging.getLogger("maxmin_inspect")

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more part images (JPEG, PNG, BMP, TIFF)",
                        },
                        "source": {"type": "string", "description": "line or station id"},
                        "part_id": {"type": "string", "description": "the part's id"},
                    },
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def to_public(pred: Prediction | StoredPrediction) -> PredictionPublic:
    """The API's view of a stored prediction."""
    return PredictionPublic(
        id=pred.id,
        image_sha256=pred.image_sha256,
        image_url=f"/images/{pred.image_sha256}",
        created_at=as_utc(pred.created_at),
        source=pred.source,
        part_id=pred.part_id,
        filename=pred.filename,
        agree=pred.agree,
        results={
            o.model_name: {
                "label": o.label,
                "confidence": o.confidence,
                "probabilities": o.probabilities,
                "latency_ms": o.latency_ms,
                "model_version": o.model_version,
            }
            for o in pred.outputs
        },
        label=pred.label,
        labelled_by=pred.labelled_by,
        labelled_at=as_utc(pred.labelled_at),
        history=[
            {"label": e.label, "labelled_by": e.labelled_by, "created_at": as_utc(e.created_at)}
            for e in pred.history
        ],
        decision=(
            {"action": pred.decision, "reason": pred.decision_reason or ""}
            if pred.decision
            else None
        ),
    )


def _text(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise HTTPException(422, detail=f"'{name}' must be text, not a file")
    value = value.strip()
    if "\x00" in value:
        raise HTTPException(422, detail=f"'{name}' contains a NUL character")
    if len(value) > 200:
        raise HTTPException(422, detail=f"'{name}' is longer than 200 characters")
    return value or None


async def _read_uploads(
    request: Request, settings: SettingsDep
) -> tuple[list[tuple[str | None, bytes]], str | None, str | None]:
    """The uploaded images as (filename, bytes), and the metadata, from multipart or a raw body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    source = request.query_params.get("source")
    part_id = request.query_params.get("part_id")
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await request.body()
        if not data:
            raise HTTPException(400, detail="empty request body: send the image bytes")
        if len(data) > settings.max_file_bytes:
            raise HTTPException(413, detail=f"image larger than {settings.max_file_bytes} bytes")
        return [(None, data)], _text(source, "source"), _text(part_id, "part_id")
    if ctype != "multipart/form-data":
        raise HTTPException(
            415,
            detail="send images as multipart/form-data field 'files', or one image body "
            f"with Content-Type image/*, not {ctype or 'no Content-Type'}",
        )
    try:
        form = await request.form(max_files=settings.max_files, max_fields=20)
    except (MultiPartException, StarletteHTTPException) as exc:
        # Starlette reports parser errors as a 400 of its own; too many files is a size limit.
        message = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        status = 413 if "Too many" in message else 400
        raise HTTPException(status, detail=f"multipart body refused: {message}") from None
    files = form.getlist("files")
    if not files:
        raise HTTPException(422, detail="no images: send one or more files in the field 'files'")
    uploads = []
    for item in files:
        if not isinstance(item, UploadFile):
            raise HTTPException(422, detail="field 'files' must hold files, not text")
        data = await item.read(settings.max_file_bytes + 1)
        name = (item.filename or "")[:255] or None
        if name is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            # PostgreSQL refuses NUL in text, and control characters have no place in a file name.
            raise HTTPException(
                422, detail=f"file name {name!r} contains a control character; rename the file"
            )
        if len(data) > settings.max_file_bytes:
            raise HTTPException(
                413, detail=f"file {name!r} is larger than {settings.max_file_bytes} bytes"
            )
        if not data:
            raise HTTPException(422, detail=f"file {name!r} is empty")
        uploads.append((name, data))
    source = _text(form.get("source", source), "source")
    part_id = _text(form.get("part_id", part_id), "part_id")
    return uploads, source, part_id


def _decode_all(
    classifier: ServedRun,
    uploads: list[tuple[str | None, bytes]],
    settings: Settings,
    budget: PixelBudget,
) -> list[Decoded]:
    """Decode and preprocess every upload; all must be images or the request is refused. Each
    decode waits for room in the worker's pixel budget; the request's images together may hold
    at most ``max_request_pixels``, checked from their headers before each decode."""
    decoded = []
    total = 0

    @contextmanager
    def before_load(width: int, height: int) -> Iterator[None]:
        nonlocal total
        total += width * height
        if total > settings.max_request_pixels:
            raise ImageTooLarge(
                f"the request's images hold more than {settings.max_request_pixels} pixels "
                "in all; send them in several requests"
            )
        with budget.hold(width, height):
            yield

    for i, (name, data) in enumerate(uploads):
        label = repr(name) if name else f"#{i + 1}"
        try:
            decoded.append(classifier.decode(data, settings.max_image_pixels, before_load))
        except ImageError as exc:
            status = (
                413
                if isinstance(exc, ImageTooLarge)
                else 415
                if isinstance(exc, UnsupportedFormat)
                else 422
            )
            raise HTTPException(status, detail=f"file {label}: {exc}") from None
    return decoded


def _count(metrics, items: list, result: BatchResult, decisions: list) -> None:  # noqa: ANN001
    """Per-model latency, predictions per class, disagreements, decisions, batch sizes."""
    metrics.batch_size.observe(result.batch_size)
    for d in decisions:
        metrics.decisions.labels(d.action).inc()
    for _, outputs in items:
        for o in outputs:
            metrics.predictions.labels(o.model_name, o.label).inc()
            metrics.model_latency.labels(o.model_name).observe(o.latency_ms / 1000)
        if len({o.label for o in outputs}) > 1:
            metrics.disagreements.inc()


def _build_items(
    classifier: ServedRun,
    uploads: list[tuple[str | None, bytes]],
    decoded: list[Decoded],
    result: BatchResult,
) -> list[tuple[NewImage, list[NewOutput]]]:
    """Pair each upload with every model's answer for it."""
    items = []
    for i, ((name, data), d) in enumerate(zip(uploads, decoded, strict=True)):
        outputs = []
        for model_name, (probs, latency) in result.outputs.items():
            p = probs[i]
            k = int(p.argmax())
            outputs.append(
                NewOutput(
                    model_name=model_name,
                    model_version=classifier.models[model_name].version,
                    label=classifier.classes[k],
                    confidence=float(p[k]),
                    probabilities={
                        c: round(float(v), 6) for c, v in zip(classifier.classes, p, strict=True)
                    },
                    latency_ms=round(latency, 4),
                )
            )
        image = NewImage(
            sha256=hashlib.sha256(data).hexdigest(),
            data=data,
            content_type=d.content_type,
            width=d.width,
            height=d.height,
            filename=name,
        )
        items.append((image, outputs))
    return items


async def _decode_in_pool(
    request: Request,
    classifier: ServedRun,
    uploads: list[tuple[str | None, bytes]],
    settings: Settings,
) -> list[Decoded]:
    """``_decode_all`` in the worker's decoding pool: a small pool of its own, since decoding in
    the default pool of 40 threads thrashes the GIL and starves the event loop under load."""
    return await asyncio.get_running_loop().run_in_executor(
        request.app.state.decode_pool,
        _decode_all,
        classifier,
        uploads,
        settings,
        request.app.state.decode_budget,
    )


async def _shadow_answers(
    request: Request,
    settings: Settings,
    champion: ServedRun,
    uploads: list[tuple[str | None, bytes]],
    decoded: list[Decoded],
    arrays: np.ndarray,
) -> list[NewShadow] | None:
    """The challenger's answers for the request's images, under its own operating point; None
    when no challenger is loaded or it could not answer. Never fails the request: the champion's
    answer is what the line gets."""
    shadow = request.app.state.shadow
    challenger, run_id = shadow.classifier, shadow.run_id
    if challenger is None or run_id is None or not settings.shadow:
        return None
    metrics = request.app.state.metrics.shadow
    try:
        if challenger.preprocess != champion.preprocess:  # another size or channels: decode again
            mine = await _decode_in_pool(request, challenger, uploads, settings)
            arrays = np.stack([d.array for d in mine])
        result = await asyncio.wrap_future(challenger.batcher.submit(arrays))
    except Exception as exc:  # noqa: BLE001 - overloaded, model process down, a bad decode
        metrics.labels(type(exc).__name__).inc(len(decoded))
        log.warning("the challenger did not answer in shadow: %s", exc)
        return None
    answers = []
    versions = {name: m.version for name, m in challenger.models.items()}
    for i in range(len(decoded)):
        said = {}
        for name, (probs, _) in result.outputs.items():
            k = int(probs[i].argmax())
            said[name] = (challenger.classes[k], float(probs[i][k]))
        d = decide(said, challenger.thresholds, challenger.good_class)
        answers.append(
            NewShadow(
                run_id=run_id,
                decision=d.action,
                labels={n: label for n, (label, _) in said.items()},
                confidences={n: round(c, 6) for n, (_, c) in said.items()},
                versions=versions,
            )
        )
    metrics.labels("stored").inc(len(answers))
    return answers


@router.post(
    "/predict",
    response_model=PredictionsPublic,
    summary="Classify part images with both models (A/B) and store them",
    openapi_extra=PREDICT_BODY,
    responses={
        413: {"description": "too many files, or a file or body over the size limits"},
        415: {"description": "unsupported Content-Type"},
        422: {"description": "a file is not a readable image"},
        503: {"description": "models not loaded or database unavailable"},
    },
)
async def create_prediction(
    _: LineDep,
    request: Request,
    settings: SettingsDep,
    classifier: ClassifierDep,
) -> Response:
    """Classify each image with every A/B model; store the image once and the predictions.

    The response's Server-Timing header says where the time went: parse, decode (including any
    wait for a decoding thread), preprocess, queue (waiting for a batch), model, db, serialize;
    and the parts of db: db_wait (for the writer), db_files (the group's new image files), db_lock
    (for the write lock), db_sql (statements and commit).
    """
    t0 = time.perf_counter()
    uploads, source, part_id = await _read_uploads(request, settings)
    t1 = time.perf_counter()
    batcher = classifier.batcher  # these models' own: a switch of runs cannot mix them up
    with batcher.coming():  # a pass about to start waits a moment for these images
        decoded = await _decode_in_pool(request, classifier, uploads, settings)
    t2 = time.perf_counter()
    arrays = np.stack([d.array for d in decoded])
    # The challenger's pass, when there is one, runs beside the champion's; the answer waits for
    # both.
    shadow = None
    if settings.shadow and request.app.state.shadow.classifier is not None:
        shadow = asyncio.ensure_future(
            _shadow_answers(request, settings, classifier, uploads, decoded, arrays)
        )
    try:
        result = await asyncio.wrap_future(batcher.submit(arrays))
    except Overloaded as exc:
        if shadow is not None:
            shadow.cancel()
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": "1"}) from None
    except ModelProcessFailed as exc:
        if shadow is not None:
            shadow.cancel()
        raise HTTPException(
            503, detail=f"models unavailable: {exc}", headers={"Retry-After": "2"}
        ) from None
    shadow_answers = await shadow if shadow is not None else None
    t3 = time.perf_counter()
    items = _build_items(classifier, uploads, decoded, result)
    decisions = [
        decide(
            {o.model_name: (o.label, o.confidence) for o in outputs},
            classifier.thresholds,
            classifier.good_class,
        )
        for _, outputs in items
    ]
    _count(request.app.state.metrics, items, result, decisions)
    batch = PredictionBatch(items, classifier.classes, source, part_id, decisions, shadow_answers)
    try:
        written = await asyncio.wrap_future(request.app.state.writer.submit(batch))
    except WriterUnavailable as exc:
        raise HTTPException(
            503, detail=f"database writer unavailable: {exc}", headers={"Retry-After": "2"}
        ) from None
    t4 = time.perf_counter()
    data = [to_public(p) for p in written.predictions]
    body = PredictionsPublic(data=data, count=len(data)).model_dump_json()
    t5 = time.perf_counter()
    preprocess = sum(d.preprocess_s for d in decoded)
    timing = {
        "parse": t1 - t0,
        "decode": t2 - t1 - preprocess,
        "preprocess": preprocess,
        "queue": result.queue_ms / 1000,
        "model": result.model_ms / 1000,
        "db": t4 - t3,
        "serialize": t5 - t4,
    }
    # The parts of "db": this request's group commit, and before it the wait for the writer (its
    # queue, the group before, and on CUDA the trip to the writer process).
    w = written.timing
    timing |= {
        "db_wait": max(0.0, t4 - t3 - w.files - w.lock - w.sql),
        "db_files": w.files,
        "db_lock": w.lock,
        "db_sql": w.sql,
    }
    header = ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timing.items())
    header += f', batch;desc="{result.batch_size}"'
    return Response(body, media_type="application/json", headers={"Server-Timing": header})


@router.get("/predictions", response_model=PredictionsPublic, summary="List stored predictions")
def read_predictions(
    _: InspectorDep,
    session: SessionDep,
    settings: SettingsDep,
    since: datetime | None = None,
    until: datetime | None = None,
    source: str | None = None,
    labelled: bool | None = None,
    disagree: Annotated[bool | None, Query(description="only where the models disagree")] = None,
    predicted: Annotated[str | None, Query(description="a class any model predicted")] = None,
    decision: Annotated[
        Literal["accept", "reject", "review"] | None, Query(description="the service's decision")
    ] = None,
    oldest_first: Annotated[bool, Query(description="the review queue's order")] = False,
    skip: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> PredictionsPublic:
    """Newest first; filter by time, source, labelled or not, disagreement, predicted class and
    decision. The review queue: ``decision=review&labelled=false&oldest_first=true``."""
    f = PredictionFilter(since, until, source, labelled, disagree, predicted, decision)
    try:
        limit = min(limit, settings.page_size_max)
        rows, count = list_predictions(session, f, skip, limit, oldest_first)
    except InvalidFilter as exc:
        raise HTTPException(422, detail=str(exc)) from None
    return PredictionsPublic(data=[to_public(p) for p in rows], count=count)


@router.get(
    "/predictions/{prediction_id}",
    response_model=PredictionPublic,
    responses={404: {"description": "unknown prediction"}},
)
def read_prediction(_: InspectorDep, prediction_id: RowId, session: SessionDep) -> PredictionPublic:
    """One prediction with both models' answers and its label history."""
    try:
        return to_public(get_prediction(session, prediction_id))
    except NotFound as exc:
        raise HTTPException(404, detail=str(exc)) from None


@router.put(
    "/predictions/{prediction_id}/label",
    response_model=PredictionPublic,
    responses={
        404: {"description": "unknown prediction"},
        422: {"description": "label not among the classes"},
    },
)
def update_label(
    who: InspectorDep, prediction_id: RowId, body: LabelUpdate, session: SessionDep
) -> PredictionPublic:
    """Set the inspector's ground truth; a correction keeps the earlier labels in the history."""
    try:
        labelled_by = body.labelled_by or who.name  # the key's owner unless named
        return to_public(set_label(session, prediction_id, body.label, labelled_by))
    except NotFound as exc:
        raise HTTPException(404, detail=str(exc)) from None
    except InvalidLabel as exc:
        raise HTTPException(422, detail=str(exc)) from None
