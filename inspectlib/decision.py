"""When a model's answer stands and when a part goes to a person: the operating point.

Each model of a run gets a confidence threshold, chosen on the validation split: an answer below it
goes to review. With the good class named, the threshold keeps the escape rate (defective parts
accepted as good, over all defective parts) under the target; without it, the error rate among the
accepted answers. The lowest such threshold is chosen, so as few parts as possible go to review.
The trainer chooses it (``choose_operating_point``); the service and ``maxmin-inspect predict``
apply it (``decide``), so both follow one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEVER = 1.01  # a threshold no confidence reaches: every part goes to review


def rates_at(
    prob: np.ndarray, y: np.ndarray, threshold: float, good: int | None
) -> dict[str, float]:
    """At ``threshold``: the share of parts sent to review, and the rate the target bounds (the
    escape rate with a good class, else the error rate among accepted parts)."""
    pred, conf = prob.argmax(1), prob.max(1)
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
    conf = np.sort(np.unique(prob.max(1))) if len(y) else np.zeros(0)
    threshold = NEVER
    for t in np.concatenate([[0.0], conf]):
        if rates_at(prob, y, float(t), good)["rate"] <= target:
            threshold = float(t)
            break
    grid = np.linspace(0.0, 1.0, points)
    curve = [{"threshold": round(float(t), 4), **rates_at(prob, y, float(t), good)} for t in grid]
    return {
        "kind": "escape_rate" if good is not None else "error_rate",
        "target": target,
        "threshold": round(threshold, 6),
        "validation": rates_at(prob, y, threshold, good),
        "curve": curve,
    }


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
