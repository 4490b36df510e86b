"""Intervals, McNemar and the verdict's honesty."""

from __future__ import annotations

import numpy as np
import pytest

from inspectlib.stats import mcnemar, paired_bootstrap, paired_difference_ci, rate_interval
from training.poc import choose_metric, failed_against_siblings, verdict


def test_paired_interval_matches_t_distribution() -> None:
    ci = paired_difference_ci([0.80, 0.82, 0.84], [0.78, 0.79, 0.80])
    # differences 0.02, 0.03, 0.04: mean 0.03, sd 0.01, t(0.975, 2) = 4.3027
    assert ci["mean"] == pytest.approx(0.03)
    assert ci["low"] == pytest.approx(0.03 - 4.3027 * 0.01 / np.sqrt(3), abs=1e-4)
    assert ci["high"] == pytest.approx(0.03 + 4.3027 * 0.01 / np.sqrt(3), abs=1e-4)
    single = paired_difference_ci([0.9], [0.8])
    assert single["low"] is None and single["mean"] == pytest.approx(0.1)


def test_mcnemar_exact() -> None:
    model = np.array([1] * 10 + [0] * 0 + [1] * 50, dtype=bool)
    base = np.array([0] * 10 + [1] * 0 + [1] * 50, dtype=bool)
    t = mcnemar(model, base)
    assert t["only_model_correct"] == 10 and t["only_baseline_correct"] == 0
    assert t["p_value"] == pytest.approx(2 * 0.5**10)
    assert mcnemar(base, base)["p_value"] == 1.0


def _report(mean: float, low: float | None, high: float | None, half_low: float | None = None):  # noqa: ANN202
    models = {
        "baseline": {"score": {"mean": 0.80}},
        "maxmin": {"score": {"mean": 0.80 + mean}},
    }
    n = 1 if low is None else 3
    comp = {
        "maxmin": {
            "difference": {"mean": mean, "low": low, "high": high, "n": n},
            "params_ratio": 2.0,
            "latency_ratio": 1.5,
        }
    }
    if half_low is not None:
        comp["maxmin_half"] = {"difference": {"mean": 0.01, "low": half_low, "high": 0.03, "n": 3}}
    return models, comp


def test_verdict_claims_a_gain_only_when_the_interval_is_above_zero() -> None:
    assert "real gain" in verdict(*_report(0.03, 0.01, 0.05))
    unsure = verdict(*_report(0.03, -0.01, 0.07))
    assert "no reliable difference" in unsure and "real gain" not in unsure
    assert "worse" in verdict(*_report(-0.03, -0.05, -0.01))
    single = verdict(*_report(0.03, 0.01, 0.05))
    assert "One seed" not in single
    models, comp = _report(0.03, 0.01, 0.05)
    comp["maxmin"]["difference"]["n"] = 1
    assert "One seed cannot separate" in verdict(models, comp)
    assert "from MaxMin itself" in verdict(*_report(0.03, 0.01, 0.05, half_low=0.005))
    assert "extra size" in verdict(*_report(0.03, 0.01, 0.05, half_low=-0.01))


def test_verdict_names_its_metric_and_counts_failed_seeds_against_the_model() -> None:
    models, comp = _report(0.01, -0.02, 0.04)
    models["maxmin"].update(seeds_failed=1, seeds_run=3)
    text = verdict(models, comp, "macro_f1")
    assert "81.0% macro F1 against 80.0%" in text
    assert "MaxMin failed to train on 1 of 3 seed(s)" in text


def test_paired_bootstrap_holds_seed_and_image_noise() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    same = [y.copy(), y.copy()]
    flat = paired_bootstrap("macro_f1", y, same, same, 3)
    assert flat["mean"] == 0 and flat["low"] == 0 and flat["high"] == 0 and flat["n"] == 2
    # a: right on 90% of the images; b: right on 60%. The gain is real and the interval says so.
    a = [np.where(rng.random(300) < 0.9, y, (y + 1) % 3) for _ in range(3)]
    b = [np.where(rng.random(300) < 0.6, y, (y + 1) % 3) for _ in range(3)]
    d = paired_bootstrap("accuracy", y, a, b, 3)
    assert d["low"] > 0.2 and d["high"] < 0.4 and d["low"] < d["mean"] < d["high"]
    assert paired_bootstrap("accuracy", y, b, a, 3)["high"] < 0
    # One wild seed widens the interval: the seeds are resampled, not only the images.
    wild = [a[0], a[1], b[2]]
    assert paired_bootstrap("accuracy", y, wild, b, 3)["low"] < d["low"] - 0.05
    # Macro F1 sees a model that never answers the rare class; accuracy barely does.
    y = np.array([0] * 95 + [1] * 5)
    majority, perfect = [np.zeros(100, dtype=int)], [y.copy()]
    f1 = paired_bootstrap("macro_f1", y, perfect, majority, 2)
    acc = paired_bootstrap("accuracy", y, perfect, majority, 2)
    assert f1["mean"] > 0.45 and acc["mean"] == pytest.approx(0.05)


def test_rate_interval() -> None:
    hits = [np.array([True] * 10 + [False] * 90), np.array([True] * 30 + [False] * 70)]
    r = rate_interval(hits)
    assert r["rate"] == pytest.approx(0.2) and r["images"] == 100
    assert 0.03 < r["low"] < 0.2 < r["high"] < 0.45  # the seeds disagree: a wide interval


def test_metric_choice_and_the_failed_seed_rule() -> None:
    assert choose_metric("auto", [100, 100, 90])[0] == "accuracy"
    assert choose_metric("auto", [630, 84, 22])[0] == "macro_f1"
    assert choose_metric("accuracy", [630, 22]) == ("accuracy", "asked for")
    # A seed at 87.6 % beside one at 99.4 % failed; NEU-like spread and ELPV-like spread did not.
    assert failed_against_siblings([0.994, 0.876]) == [False, True]
    assert failed_against_siblings([0.984, 0.974, 0.989]) == [False, False, False]
    assert failed_against_siblings([0.42, 0.34]) == [False, False]
    assert failed_against_siblings([0.71, 0.62, 0.37]) == [False, False, True]
    assert failed_against_siblings([0.5]) == [False]


def test_paired_bootstrap_can_keep_every_pair_and_draw_only_the_images() -> None:
    """Pairs that are not a sample (one per model) are all kept in every resample: their
    disagreement is then no noise, and only the images are drawn."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    right, wrong = y.copy(), 1 - y
    some = np.where(rng.random(400) < 0.5, y, 1 - y)
    # One pair far better, one far worse: the mean is near zero either way.
    a, b = [right, some], [some, right]
    drawn = paired_bootstrap("accuracy", y, a, b, 2)
    kept = paired_bootstrap("accuracy", y, a, b, 2, draw_pairs=False)
    assert abs(drawn["mean"]) < 1e-9 and abs(kept["mean"]) < 1e-9
    assert kept["high"] - kept["low"] < 0.25 * (drawn["high"] - drawn["low"])
    assert "seeds" not in kept["method"] and "seeds" in drawn["method"]
    assert paired_bootstrap("accuracy", y, [right], [wrong], 2, draw_pairs=False)["low"] == 1.0
