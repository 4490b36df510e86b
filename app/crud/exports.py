"""Labelled parts as training data: what inspectors confirmed or corrected, one row per image."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.storage import ImageStore
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


SUFFIX = {"image/png": ".png", "image/bmp": ".bmp", "image/tiff": ".tif"}
COLUMNS = [
    "path", "label", "sha256", "labelled_by", "labelled_at", "prediction_id", "source", "part_id",
    "model_versions",
]  # fmt: skip


def write_export(
    rows: list[LabelledImage],
    store: ImageStore,
    out: Path,
    split_of: Callable[[LabelledImage], str] | None = None,
) -> tuple[list[tuple[Path, LabelledImage]], list[str]]:
    """Copy each labelled image into ``out/<label>/<sha256>.<ext>`` and list them in
    ``out/labels.csv`` (a manifest the trainer reads), with ``split`` from ``split_of`` when
    given. Returns the files written and the hashes missing from the store."""
    written, missing = [], []
    for r in rows:
        data = store.read(r.sha256)
        if data is None:
            missing.append(r.sha256)
            continue
        folder = re.sub(r"[^A-Za-z0-9._ -]", "_", r.label).strip(". ") or "_"
        dst = out / folder / f"{r.sha256}{SUFFIX.get(r.content_type, '.jpg')}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        written.append((dst, r))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS + (["split"] if split_of else []))
        for dst, r in written:
            w.writerow(
                [dst.relative_to(out).as_posix(), r.label, r.sha256, r.labelled_by or "",
                 r.labelled_at.isoformat() if r.labelled_at else "", r.prediction_id,
                 r.source or "", r.part_id or "", json.dumps(r.model_versions, sort_keys=True)]
                + ([split_of(r)] if split_of else [])
            )  # fmt: skip
    return written, missing
