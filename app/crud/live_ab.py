"""The live A/B comparison on the parts inspectors labelled: accuracy with intervals, the paired
test, confusion matrices, agreement and latency."""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.crud.errors import as_utc
from app.crud.predictions import PredictionFilter, filtered_query
from app.tables import ModelOutput, Prediction


def _wilson(correct: int, n: int) -> dict[str, float | None]:
    if n == 0:
        return {"value": None, "low": None, "high": None}
    from scipy import stats as sps  # here: the database writer process never needs it

    ci = sps.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return {"value": correct / n, "low": float(ci.low), "high": float(ci.high)}


def served_versions(classifier) -> dict[str, str]:  # noqa: ANN001 - a ServedRun
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
            filtered_query(select(func.count(Prediction.id)), every)
        ).scalar_one()
    total = session.execute(filtered_query(select(func.count(Prediction.id)), f)).scalar_one()
    agree = session.execute(
        filtered_query(select(func.count(Prediction.id)), f).where(Prediction.agree.is_(True))
    ).scalar_one()
    labelled_rows = session.execute(
        filtered_query(select(Prediction.id, Prediction.label), f).where(
            Prediction.label.is_not(None)
        )
    ).all()
    truth = {pid: label for pid, label in labelled_rows}
    outputs = session.execute(
        filtered_query(
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


def decision_stats(
    session: Session,
    since: datetime | None,
    until: datetime | None,
    versions: dict[str, str] | None,
    good_class: str | None,
) -> dict:
    """The operating point on the line: how often parts went to review, and, on the parts
    inspectors labelled, how many defective ones the service accepted as good (the escape rate,
    with a Wilson interval) when the good class is known."""
    f = PredictionFilter(since=since, until=until, versions=versions)
    rows = session.execute(
        filtered_query(select(Prediction.decision, Prediction.label), f).where(
            Prediction.decision.is_not(None)
        )
    ).all()
    counts = {a: sum(1 for d, _ in rows if d == a) for a in ("accept", "reject", "review")}
    decided = sum(counts.values())
    escape = None
    if good_class is not None:
        defective = [d for d, label in rows if label is not None and label != good_class]
        escape = _wilson(sum(1 for d in defective if d == "accept"), len(defective))
        escape["labelled_defective"] = len(defective)
    return {
        "counts": counts,
        "review_rate": counts["review"] / decided if decided else None,
        "good_class": good_class,
        "escape_rate": escape,
    }
