"""The statistics behind the verdict: intervals over seeds and McNemar's paired test."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for the spread of a single value)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"mean": None, "std": None}
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
    }


def paired_difference_ci(
    a: list[float], b: list[float], level: float = 0.95
) -> dict[str, float | int | None]:
    """Mean of a - b over paired seeds with a Student-t interval (None bounds with one seed)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = int(diff.size)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(diff.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    sem = float(diff.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sem
    # An accuracy difference lies in [-1, 1] whatever a small-sample interval says.
    return {"mean": mean, "low": max(mean - half, -1.0), "high": min(mean + half, 1.0), "n": n}


def mcnemar(model_correct: np.ndarray, baseline_correct: np.ndarray) -> dict[str, float | int]:
    """Exact McNemar test on the same test images, from the images only one model got right."""
    m = np.asarray(model_correct, dtype=bool)
    b = np.asarray(baseline_correct, dtype=bool)
    only_model = int(np.sum(m & ~b))
    only_baseline = int(np.sum(~m & b))
    n = only_model + only_baseline
    p = 1.0 if n == 0 else float(stats.binomtest(only_model, n, 0.5).pvalue)
    return {
        "only_model_correct": only_model,
        "only_baseline_correct": only_baseline,
        "p_value": p,
    }
