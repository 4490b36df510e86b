"""The package layers hold: models <- inspectlib <- training | app <- maxmin_inspect, and the
trainer and the service never import each other (import-linter's contract in pyproject.toml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "inspectlib", "training", "app", "maxmin_inspect")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", "import sys, importlinter.cli as c; sys.exit(c.lint_imports("
         "no_cache=True, no_logo=True))"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_layers_are_kept() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_from_the_service_into_the_trainer_is_caught(tmp_path: Path) -> None:
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with (tmp_path / "training" / "demo.py").open("a") as fh:
        fh.write("\nfrom app.crud.runs import register_run  # noqa: E402, F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "training is not allowed to import app" in result.stdout
    assert "training.demo -> app.crud.runs" in result.stdout


def test_the_command_line_the_api_and_the_trainer_share_their_defaults() -> None:
    import pytest
    from pydantic import ValidationError

    from app.schemas import TrainingRequest
    from maxmin_inspect.main import get_args_parser
    from training.engine import TrainConfig
    from training.poc import PocConfig

    args = get_args_parser().parse_args(["train", "data"])
    api = TrainingRequest(dataset="data")
    poc, train = PocConfig("data", "out"), TrainConfig()
    assert args.size == api.size == poc.size
    assert args.epochs == api.epochs == train.epochs
    assert args.seeds == api.seeds == poc.seeds
    assert args.models.split(",") == api.models == poc.models
    assert args.batch_size == train.batch_size and args.retries == poc.max_retries
    # The same bounds on both doors: what the API refuses, the command line refuses.
    schema = TrainingRequest.model_json_schema()["properties"]
    for option, field in (("--size", "size"), ("--epochs", "epochs"), ("--seeds", "seeds")):
        high = schema[field]["maximum"]
        assert getattr(get_args_parser().parse_args(["train", "d", option, str(high)]), field)
        with pytest.raises(SystemExit):
            get_args_parser().parse_args(["train", "d", option, str(high + 1)])
        with pytest.raises(ValidationError):
            TrainingRequest(dataset="d", **{field: high + 1})
