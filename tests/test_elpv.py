"""Training on a stratified subset of the real ELPV solar-cell images (present in CI): skewed
classes and subtle differences, where a recipe that suits one model can leave another at chance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from maxmin_inspect.main import main
from tests.helpers import copy_subset
from training.engine import macro_f1

FRACTION = 4  # every fourth image of each class: the source's skew, in a quarter of the time


@pytest.mark.slow
def test_every_model_beats_the_majority_rule_on_elpv(elpv_dir: Path, tmp_path: Path) -> None:
    subset = tmp_path / "elpv"
    classes = copy_subset(elpv_dir, subset, FRACTION)
    out = tmp_path / "run"
    argv = ["train", str(subset), "--out", str(out), "--size", "40", "--epochs", "12"]
    argv += ["--seeds", "1", "--latency-seconds", "0.1", "--quiet", "--no-register"]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--good-class", "functional"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["metric"]["name"] == "macro_f1"  # 57 % in one class: accuracy would hide failure
    counts = r["dataset"]["counts"]["test"]
    y = np.repeat(np.arange(len(classes)), [counts[c] for c in classes])
    majority = macro_f1(y, np.full_like(y, int(np.argmax([counts[c] for c in classes]))), 4)
    for name, m in r["models"].items():
        assert not m["diverged"], (name, m["diverged"])
        # A clear margin: the majority rule scores about 0.18 here, these models 0.35 and more.
        assert m["macro_f1"]["mean"] > majority + 0.12, (name, m["macro_f1"], majority)
        # Defects told from good parts better than any constant answer can: always answering
        # "functional" escapes every defect, always answering a defect rejects every good part,
        # and both sum to 1. Where a model sits on that trade-off (one seed, 42 defects) moves
        # with the seed; the operating point, not the raw answer, sets the escape rate served.
        escape, reject = m["escape_rate"]["rate"], m["false_reject_rate"]["rate"]
        assert escape + reject < 0.85, (name, m["escape_rate"], m["false_reject_rate"])
