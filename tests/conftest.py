"""Shared fixtures: small generated image folders, one trained run, the real datasets, the
databases, the test device. Helpers that are not fixtures live in tests/helpers.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tests.helpers import make_key, postgres_database, train_small_run, write_folder

REPO = Path(__file__).resolve().parents[1]
NEU_DIR = Path(
    os.environ.get("MAXMIN_NEU_DIR", REPO.parent / "shared" / "datasets" / "neu_surface")
)
ELPV_DIR = Path(os.environ.get("MAXMIN_ELPV_DIR", REPO.parent / "shared" / "datasets" / "elpv"))


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    """Three classes of 10 generated images each."""
    return write_folder(tmp_path / "parts", {"good": 10, "scratch": 10, "dent": 10})


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the model tests run on: MAXMIN_TEST_DEVICE, else CUDA when present."""
    name = os.environ.get("MAXMIN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _real_data(path: Path, name: str) -> Path:
    """A real dataset beside the checkout: skipped when absent, a failure where CI requires it
    (MAXMIN_REQUIRE_<NAME>=1)."""
    if not path.is_dir():
        if os.environ.get(f"MAXMIN_REQUIRE_{name}") == "1":
            pytest.fail(f"{name} data not found at {path} (MAXMIN_REQUIRE_{name}=1)")
        pytest.skip(f"{name} data not found at {path}; set MAXMIN_{name}_DIR to run this test")
    return path


@pytest.fixture(scope="session")
def neu_dir() -> Path:
    """The NEU surface-defect images (balanced classes)."""
    return _real_data(NEU_DIR, "NEU")


@pytest.fixture(scope="session")
def elpv_dir() -> Path:
    """The ELPV solar-cell images (skewed classes)."""
    return _real_data(ELPV_DIR, "ELPV")


@pytest.fixture(autouse=True, scope="session")
def _service_data_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Commands that register runs write to a throwaway database, never the checkout's var/; the
    environment is restored when the session ends."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAXMIN_DATA_DIR", str(tmp_path_factory.mktemp("service-data")))
        mp.delenv("DATABASE_URL", raising=False)
        yield


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real (tiny) training run with baseline and MaxMin, trained once per session and shared
    by the service tests, which only read it."""
    return train_small_run(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def compressed_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained run with its compression study done (ONNX fp32 and int8 forms);
    shared by the tests that read or serve the forms."""
    import shutil

    from training.compress import compress_run

    run = tmp_path_factory.mktemp("compressed") / "run"
    shutil.copytree(trained_run, run)
    compress_run(run, rounds=2)
    return run


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The test runs twice: on a fresh SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'maxmin.db'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def service_client(tmp_path: Path) -> Callable[..., AbstractContextManager[TestClient]]:
    """A factory for the service in-process: ``with service_client(run_dir, db_url=...,
    role="admin", **settings) as client`` migrates the database (a fresh SQLite file unless
    ``db_url`` is given), starts the app on the CPU with ``settings`` and sends an API key of
    ``role`` with every request."""

    from app.core.config import Settings
    from app.core.db import upgrade
    from app.main import create_app

    @contextmanager
    def start(
        run_dir: Path | None, db_url: str | None = None, role: str = "admin", **settings: object
    ) -> Iterator[TestClient]:
        url = db_url or f"sqlite:///{tmp_path / 'db' / 'maxmin.db'}"
        upgrade(url)
        options = {"data_dir": tmp_path / "var", "run_dir": run_dir, "device": "cpu"} | settings
        app = create_app(Settings(database_url=url, **options))
        with TestClient(app, headers={"X-API-Key": make_key(url, role)}) as client:
            yield client

    return start
