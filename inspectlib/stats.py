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


def _scores(metric: str, y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """``metric`` of each row of ``pred`` (R x N) against each row of ``y`` (R x N)."""
    r = y.shape[0]
    flat = (np.arange(r)[:, None] * k * k + y * k + pred).ravel()
    cm = np.bincount(flat, minlength=r * k * k).reshape(r, k, k).astype(float)
    if metric == "accuracy":
        return np.trace(cm, axis1=1, axis2=2) / max(y.shape[1], 1)
    denom = cm.sum(1) + cm.sum(2)
    diag = np.diagonal(cm, axis1=1, axis2=2)
    return np.mean(np.where(denom > 0, 2 * diag / np.maximum(denom, 1), 0.0), axis=1)


def paired_bootstrap(
    metric: str,
    y: np.ndarray,
    preds_a: list[np.ndarray],
    preds_b: list[np.ndarray],
    k: int,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    draw_pairs: bool = True,
) -> dict[str, float | int | str | None]:
    """Mean over seeds of ``metric``(a) - ``metric``(b) on the same test images, with a two-level
    percentile bootstrap: each resample draws the seed pairs with replacement, then the test
    images with replacement (the same images for both models). So the interval holds both the seed
    noise and the finite test set, which a t-interval over 2-3 seed differences cannot.

    ``draw_pairs=False`` keeps every pair in each resample and draws only the images: for pairs
    that are not a sample of anything, such as one pair per model."""
    y = np.asarray(y)
    n_seeds = min(len(preds_a), len(preds_b))
    if n_seeds == 0 or len(y) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0, "method": "paired bootstrap"}
    a = np.stack([np.asarray(p) for p in preds_a[:n_seeds]])
    b = np.stack([np.asarray(p) for p in preds_b[:n_seeds]])
    ys = np.broadcast_to(y, a.shape)
    mean = float(np.mean(_scores(metric, ys, a, k) - _scores(metric, ys, b, k)))
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for i in range(resamples):
        s = rng.integers(0, n_seeds, n_seeds) if draw_pairs else np.arange(n_seeds)
        idx = rng.integers(0, len(y), len(y))
        yy = np.broadcast_to(y[idx], (n_seeds, len(y)))
        diffs[i] = np.mean(
            _scores(metric, yy, a[s][:, idx], k) - _scores(metric, yy, b[s][:, idx], k)
        )
    tail = (1 - level) / 2 * 100
    return {
        "mean": mean,
        "low": float(np.percentile(diffs, tail)),
        "high": float(np.percentile(diffs, 100 - tail)),
        "n": n_seeds,
        "method": f"paired bootstrap over {'seeds and ' if draw_pairs else ''}test images "
        f"({resamples} resamples)",
    }


def rate_interval(
    hits: list[np.ndarray], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, float | int | None]:
    """Mean over seeds of the fraction of True in each of ``hits`` (one boolean array per seed,
    over the same images), with the same two-level bootstrap as :func:`paired_bootstrap`."""
    if not hits or len(hits[0]) == 0:
        return {"rate": None, "low": None, "high": None, "images": 0}
    h = np.stack([np.asarray(x, dtype=float) for x in hits])
    rng = np.random.default_rng(seed)
    n_seeds, n = h.shape
    draws = np.empty(resamples)
    for i in range(resamples):
        draws[i] = h[rng.integers(0, n_seeds, n_seeds)][:, rng.integers(0, n, n)].mean()
    tail = (1 - level) / 2 * 100
    return {
        "rate": float(h.mean()),
        "low": float(np.percentile(draws, tail)),
        "high": float(np.percentile(draws, 100 - tail)),
        "images": int(n),
    }


def paired_rate_difference(
    a: np.ndarray, b: np.ndarray, level: float = 0.95
) -> dict[str, float | int | None]:
    """Rate of ``b`` minus rate of ``a`` (booleans over the same parts: say, escapes of the
    challenger and of the champion) with a one-sided upper bound at ``level``.

    Wald's interval for a paired difference, with 0.5 added to each cell of the paired 2 x 2 table
    (Agresti and Min, 2005), so that a sample with no discordant parts still gets a bound above
    the observed difference rather than none."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = int(x.size)
    if n == 0:
        return {"difference": None, "upper": None, "parts": 0, "rate_a": None, "rate_b": None}
    only_b = int(np.sum(y & ~x)) + 0.5
    only_a = int(np.sum(x & ~y)) + 0.5
    m = n + 2.0  # the four cells' 0.5 each
    diff = (only_b - only_a) / m
    se = math.sqrt(max((only_a + only_b) / m - diff**2, 0.0) / m)
    z = float(stats.norm.ppf(level))
    return {
        "difference": float(y.mean() - x.mean()),
        "upper": min(diff + z * se, 1.0),
        "parts": n,
        "rate_a": float(x.mean()),
        "rate_b": float(y.mean()),
    }
