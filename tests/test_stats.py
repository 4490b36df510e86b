"""Intervals, McNemar and the verdict's honesty."""

from __future__ import annotations

import numpy as np
import pytest

from training.poc import verdict
from training.stats import mcnemar, paired_difference_ci


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
        "baseline": {"accuracy": {"mean": 0.80}},
        "maxmin": {"accuracy": {"mean": 0.80 + mean}},
    }
    comp = {
        "maxmin": {
            "accuracy_difference": {"mean": mean, "low": low, "high": high, "n": 3},
            "params_ratio": 2.0,
            "latency_ratio": 1.5,
        }
    }
    if half_low is not None:
        comp["maxmin_half"] = {
            "accuracy_difference": {"mean": 0.01, "low": half_low, "high": 0.03, "n": 3}
        }
    return models, comp


def test_verdict_claims_a_gain_only_when_the_interval_is_above_zero() -> None:
    assert "real gain" in verdict(*_report(0.03, 0.01, 0.05))
    unsure = verdict(*_report(0.03, -0.01, 0.07))
    assert "no reliable difference" in unsure and "real gain" not in unsure
    assert "worse" in verdict(*_report(-0.03, -0.05, -0.01))
    assert "single seed" in verdict(*_report(0.03, None, None))
    assert "from MaxMin itself" in verdict(*_report(0.03, 0.01, 0.05, half_low=0.005))
    assert "extra size" in verdict(*_report(0.03, 0.01, 0.05, half_low=-0.01))
