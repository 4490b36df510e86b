"""When a model's answer stands and when a part goes to a person: the operating point.

Each model of a run gets a confidence threshold, chosen on the validation split: an answer below it
goes to review. With the good class named, the threshold keeps the escape rate (defective parts
accepted as good, over all defective parts) under the target; without it, the error rate among the
accepted answers. The lowest such threshold is chosen, so as few parts as possible go to review.
The trainer chooses it (``choose_operating_point``); the service and ``maxmin-inspect predict``
apply it (``decide``), so both follow one rule.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

NEVER = 1.01  # a threshold no confidence reaches: every part goes to review


def rates_at(
    prob: np.ndarray, y: np.ndarray, threshold: float, good: int | None
) -> dict[str, float]:
    """At ``threshold``: the share of parts sent to review, and the rate the target bounds (the
    escape rate with a good class, else the error rate among accepted parts)."""
    return answer_rates(prob.max(1), prob.argmax(1), y, threshold, good)


def answer_rates(
    conf: np.ndarray, pred: np.ndarray, y: np.ndarray, threshold: float, good: int | None
) -> dict[str, float]:
    """``rates_at`` from each part's confidence and predicted class alone (what a run keeps of
    its validation and test answers, so that the target can be changed after training)."""
    conf, pred, y = np.asarray(conf), np.asarray(pred), np.asarray(y)
    accepted = conf >= threshold
    review = float(np.mean(~accepted)) if len(y) else 0.0
    if good is not None:
        defective = y != good
        escaped = accepted & defective & (pred == good)
        rate = float(escaped.sum() / defective.sum()) if defective.any() else 0.0
    else:
        rate = float((pred[accepted] != y[accepted]).mean()) if accepted.any() else 0.0
    return {"review_rate": review, "rate": rate}


def choose_operating_point(
    prob: np.ndarray, y: np.ndarray, target: float, good: int | None, points: int = 41
) -> dict:
    """The lowest threshold whose rate on (``prob``, ``y``) is at most ``target``, with the curve
    of review rate against that rate over a grid of thresholds, for the report."""
    return choose_from_answers(prob.max(1), prob.argmax(1), y, target, good, points)


def choose_from_answers(
    conf: np.ndarray,
    pred: np.ndarray,
    y: np.ndarray,
    target: float,
    good: int | None,
    points: int = 41,
) -> dict:
    """``choose_operating_point`` from each part's confidence and predicted class."""
    conf, pred, y = np.asarray(conf, dtype=float), np.asarray(pred), np.asarray(y)
    candidates = np.sort(np.unique(conf)) if len(y) else np.zeros(0)
    threshold = NEVER
    for t in np.concatenate([[0.0], candidates]):
        if answer_rates(conf, pred, y, float(t), good)["rate"] <= target:
            threshold = float(t)
            break
    grid = np.linspace(0.0, 1.0, points)
    curve = [
        {"threshold": round(float(t), 4), **answer_rates(conf, pred, y, float(t), good)}
        for t in grid
    ]
    return {
        "kind": "escape_rate" if good is not None else "error_rate",
        "target": target,
        "threshold": round(threshold, 6),
        "validation": answer_rates(conf, pred, y, threshold, good),
        "curve": curve,
    }


ANSWERS_FILE = "operating-answers.json"
# The key of a pruned network's answers (``compress --prune``) beside its model's own.
PRUNED_SUFFIX = ".pruned"


def answers_of(prob: np.ndarray, y: np.ndarray) -> dict[str, list]:
    """What a run keeps of one split's answers to choose a threshold again later."""
    return {
        "confidence": [round(float(c), 6) for c in prob.max(1)],
        "predicted": [int(p) for p in prob.argmax(1)],
        "truth": [int(t) for t in y],
    }


class RetargetError(ValueError):
    """The run's operating point cannot be chosen again; the message says why."""


def retarget_run(run_dir: Path, target: float, who: str | None = None) -> dict[str, dict]:
    """Choose every model's threshold of the run in ``run_dir`` again for ``target`` (the escape
    rate with the run's good class, else the error rate among accepted parts), from the
    validation answers the trainer kept, and write them into ``report.json``. Returns the new
    operating points by model. The service picks them up within ``MAXMIN_RELOAD_SECONDS``."""
    if not 0.0 <= target <= 1.0:
        raise RetargetError(f"the target must be between 0 and 1, not {target}")
    run_dir = Path(run_dir)
    report_file, answers_file = run_dir / "report.json", run_dir / ANSWERS_FILE
    if not report_file.is_file():
        raise RetargetError(f"{report_file} not found: is {run_dir} a run directory?")
    if not answers_file.is_file():
        raise RetargetError(
            f"{answers_file} not found: this run was trained before the trainer kept its "
            "validation answers; train it again to change its target"
        )
    report = json.loads(report_file.read_text())
    answers = json.loads(answers_file.read_text())
    classes = report["dataset"]["classes"]
    good_name = (report.get("metric") or {}).get("good_class")
    good = classes.index(good_name) if good_name in classes else None
    points = {}
    pruned = {
        name: section["pruning"]
        for name, section in ((report.get("compression") or {}).get("models") or {}).items()
        if section.get("pruning")
    }
    for name, kept in answers.items():
        base = name.removesuffix(PRUNED_SUFFIX)
        if name.endswith(PRUNED_SUFFIX) and base not in pruned:
            continue  # a study since run without --prune: no pruned form to serve
        if not name.endswith(PRUNED_SUFFIX) and name not in report["models"]:
            continue
        val = kept["validation"]
        point = choose_from_answers(val["confidence"], val["predicted"], val["truth"], target, good)
        test = kept.get("test")
        if test:
            point["test"] = answer_rates(
                test["confidence"], test["predicted"], test["truth"], point["threshold"], good
            )
        point["seed"] = kept.get("seed")
        point["set_by"] = who
        point["set_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        if name.endswith(PRUNED_SUFFIX):
            point.pop("curve")
            pruned[base]["operating_point"] = point
        else:
            report["models"][name]["operating_point"] = point
        points[name] = point
    tmp = report_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, report_file)  # readers see the old report or the new one, never half
    return points


@dataclass(frozen=True)
class Decision:
    action: str  # accept, reject or review
    reason: str


def decide(
    answers: dict[str, tuple[str, float]],
    thresholds: dict[str, float | None],
    good_class: str | None,
) -> Decision:
    """One part's decision from every model's (label, confidence): review when the models
    disagree or one of them is below its threshold; else accept (the good class, or any label
    when no good class is named) or reject (a defect)."""
    labels = {label for label, _ in answers.values()}
    if len(labels) > 1:
        said = ", ".join(f"{name} {label}" for name, (label, _) in answers.items())
        return Decision("review", f"the models disagree ({said})")
    unsure = [
        f"{name} {conf:.2f} < {t:.2f}"
        for name, (_, conf) in answers.items()
        if (t := thresholds.get(name)) is not None and conf < t
    ]
    if unsure:
        return Decision("review", "low confidence: " + ", ".join(unsure))
    label = labels.pop()
    if good_class is None or label == good_class:
        return Decision("accept", f"{label}, confident")
    return Decision("reject", f"{label}, confident")
