"""The live A/B comparison on the parts inspectors labelled: accuracy with intervals, the paired
test, confusion matrices, agreement and latency; and the champion run against the challenger."""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.crud.errors import as_utc
from app.crud.predictions import PredictionFilter, filtered_query
from app.tables import ModelOutput, Prediction, Run, ShadowPrediction


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


def _decided_wrong(decision: str | None, label: str | None, truth: str) -> bool:
    """A part accepted or rejected under a label that is not the inspector's (review is not an
    error: a person decides)."""
    return decision in ("accept", "reject") and label != truth


def challenger_stats(
    session: Session,
    challenger: Run,
    champion_versions: dict[str, str] | None,
    good_class: str | None,
    min_labelled: int,
    margin: float,
) -> dict:
    """The champion against the challenger on the parts inspectors labelled since the challenger
    started, each part classified by both (the challenger in shadow).

    - Per model name: paired accuracy and McNemar's exact test.
    - Per run: the escape rate (defective parts accepted as good) and the false-reject rate (good
      parts rejected) of its decisions, with Wilson intervals, when the good class is known; the
      rate of wrong decisions (accepted or rejected under the wrong label) otherwise.
    - The promotion rule: at least ``min_labelled`` paired labelled parts, and the challenger's
      rate (escape, else wrong decisions) at most ``margin`` above the champion's at 95 % one-sided
      confidence (non-inferiority); and no model of the challenger significantly less accurate
      than the champion's (McNemar, p < 0.05).
    """
    from inspectlib.stats import mcnemar, paired_rate_difference

    f = PredictionFilter(
        since=challenger.challenger_since, labelled=True, versions=champion_versions
    )
    rows = session.execute(
        filtered_query(
            select(
                Prediction.id,
                Prediction.label,
                Prediction.decision,
                ShadowPrediction.labels,
                ShadowPrediction.decision,
            )
            .join(ShadowPrediction, ShadowPrediction.prediction_id == Prediction.id)
            .where(ShadowPrediction.run_id == challenger.id),
            f,
        )
    ).all()
    ids = [r[0] for r in rows]
    champ_labels: dict[int, dict[str, str]] = {}
    for chunk in range(0, len(ids), 500):
        part = ids[chunk : chunk + 500]
        for pid, name, label in session.execute(
            select(ModelOutput.prediction_id, ModelOutput.model_name, ModelOutput.label).where(
                ModelOutput.prediction_id.in_(part)
            )
        ):
            champ_labels.setdefault(pid, {})[name] = label
    truth = [r[1] for r in rows]
    names = sorted({n for r in rows for n in r[3]} & {n for d in champ_labels.values() for n in d})
    models = {}
    worse = []
    for name in names:
        pairs = [
            (champ_labels.get(r[0], {}).get(name) == r[1], r[3].get(name) == r[1])
            for r in rows
            if name in r[3] and name in champ_labels.get(r[0], {})
        ]
        a = np.array([p[0] for p in pairs], dtype=bool)
        b = np.array([p[1] for p in pairs], dtype=bool)
        test = mcnemar(b, a)
        models[name] = {
            "parts": len(pairs),
            "champion_accuracy": _wilson(int(a.sum()), len(a)),
            "challenger_accuracy": _wilson(int(b.sum()), len(b)),
            "only_champion_correct": test["only_baseline_correct"],
            "only_challenger_correct": test["only_model_correct"],
            "mcnemar_p_value": test["p_value"],
        }
        if test["p_value"] < 0.05 and b.sum() < a.sum():
            worse.append(name)

    def decided_label(labels: dict[str, str]) -> str | None:
        said = set(labels.values())
        return said.pop() if len(said) == 1 else None

    rates: dict[str, dict] = {}
    if good_class is not None:
        defective = [i for i, t in enumerate(truth) if t != good_class]
        good = [i for i, t in enumerate(truth) if t == good_class]
        champ_escape = np.array([rows[i][2] == "accept" for i in defective], dtype=bool)
        chal_escape = np.array([rows[i][4] == "accept" for i in defective], dtype=bool)
        champ_fr = np.array([rows[i][2] == "reject" for i in good], dtype=bool)
        chal_fr = np.array([rows[i][4] == "reject" for i in good], dtype=bool)
        rates = {
            "escape_rate": {
                "champion": _wilson(int(champ_escape.sum()), len(defective)),
                "challenger": _wilson(int(chal_escape.sum()), len(defective)),
            },
            "false_reject_rate": {
                "champion": _wilson(int(champ_fr.sum()), len(good)),
                "challenger": _wilson(int(chal_fr.sum()), len(good)),
            },
        }
        rule_on, champ_bad, chal_bad = "escape rate", champ_escape, chal_escape
    else:
        champ_bad = np.array(
            [_decided_wrong(r[2], decided_label(champ_labels.get(r[0], {})), r[1]) for r in rows],
            dtype=bool,
        )
        chal_bad = np.array(
            [_decided_wrong(r[4], decided_label(r[3]), r[1]) for r in rows], dtype=bool
        )
        rates = {
            "wrong_decision_rate": {
                "champion": _wilson(int(champ_bad.sum()), len(rows)),
                "challenger": _wilson(int(chal_bad.sum()), len(rows)),
            }
        }
        rule_on = "rate of wrong decisions"
    difference = paired_rate_difference(champ_bad, chal_bad)
    labelled = len(rows)
    if labelled < min_labelled:
        verdict, ready = (
            f"not enough evidence yet: {labelled} of the {min_labelled} labelled parts the rule "
            "asks for",
            False,
        )
    elif worse:
        verdict, ready = (
            f"keep the champion: the challenger's {', '.join(worse)} is less accurate "
            "(McNemar, p < 0.05)",
            False,
        )
    elif difference["upper"] is None or difference["upper"] > margin:
        upper = difference["upper"]
        bound = "no parts to judge it on" if upper is None else f"could be {upper * 100:.1f} points"
        verdict, ready = (
            f"keep the champion: the challenger's {rule_on} {bound} above the champion's "
            f"(margin {margin * 100:.1f} points)",
            False,
        )
    else:
        verdict, ready = (
            f"ready to promote: on {labelled} labelled parts the challenger's {rule_on} is at "
            f"most {difference['upper'] * 100:.1f} points above the champion's at 95 % "
            f"confidence (margin {margin * 100:.1f} points), and no model is less accurate",
            True,
        )
    return {
        "challenger_run_id": challenger.id,
        "since": as_utc(challenger.challenger_since),
        "labelled": labelled,
        "models": models,
        "rates": rates,
        "rule": {
            "on": rule_on,
            "min_labelled": min_labelled,
            "margin": margin,
            "difference": difference,
            "ready": ready,
            "verdict": verdict,
        },
    }
