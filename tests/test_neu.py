"""Training on a stratified subset of the real NEU steel-surface images (present in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maxmin_inspect.main import main
from tests.helpers import copy_subset

PER_CLASS = 50


@pytest.mark.slow
def test_train_on_neu_subset(neu_dir: Path, tmp_path: Path) -> None:
    subset = tmp_path / "neu"
    classes = copy_subset(neu_dir, subset, 300 // PER_CLASS, PER_CLASS)
    out = tmp_path / "run"
    argv = [
        "train",
        str(subset),
        "--out",
        str(out),
        "--models",
        "baseline,maxmin",
        "--size",
        "32",
        "--epochs",
        "10",
        "--batch-size",
        "16",
        "--seeds",
        "2",
        "--latency-seconds",
        "0.2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
    ]
    assert main(argv) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["dataset"]["classes"] == classes and len(classes) == 6
    assert r["dataset"]["channels"] == 1  # NEU images are grey
    assert r["dataset"]["image_sizes"] == {"200x200": PER_CLASS * 6}
    assert sum(r["dataset"]["counts"]["test"].values()) >= 6 * 4
    chance = 1 / 6
    for name in ("baseline", "maxmin"):
        m = r["models"][name]
        assert not m["diverged"], m["diverged"]
        # Real defects are learnable: far above chance even from 35 training images per class.
        assert m["accuracy"]["mean"] > 2.5 * chance, m["accuracy"]
        assert m["macro_f1"]["mean"] > 2 * chance
    assert r["comparison"]["maxmin"]["params_ratio"] > 1.8
    assert (out / "report.html").is_file()
