"""Shared fixtures: small generated image folders, the NEU data path, the test device."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.demo import make_image

REPO = Path(__file__).resolve().parents[1]
NEU_DIR = Path(
    os.environ.get("MAXMIN_NEU_DIR", REPO.parent / "shared" / "datasets" / "neu_surface")
)
ELPV_DIR = Path(os.environ.get("MAXMIN_ELPV_DIR", REPO.parent / "shared" / "datasets" / "elpv"))


def write_folder(
    root: Path,
    per_class: dict[str, int],
    size: int = 32,
    seed: int = 0,
    fmt: str = "png",
    easy: bool = False,
) -> Path:
    """Write ``per_class[name]`` generated surface images into ``root/<name>/``.

    ``easy`` makes classes differ in brightness, learnable in a handful of steps.
    """
    rng = np.random.default_rng(seed)
    kinds = ["good", "scratch", "dent", "spots"]
    for k, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if easy:
                pixels = rng.normal(40 + 70 * k, 15, (size, size)).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, mode="L")
            else:
                img = make_image(kinds[k % len(kinds)], rng, size)
            img.save(root / name / f"{name}_{i}.{fmt}")
    return root


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    """Three classes of 10 generated images each."""
    return write_folder(tmp_path / "parts", {"good": 10, "scratch": 10, "dent": 10})


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the model tests run on: MAXMIN_TEST_DEVICE, else CUDA when present."""
    name = os.environ.get("MAXMIN_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def copy_subset(src: Path, dst: Path, step: int, limit: int | None = None) -> list[str]:
    """Every ``step``-th JPEG of each class folder of ``src`` (a spread over the class, not its
    first images; at most ``limit`` each) copied to ``dst``; returns the class names."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    for cls in classes:
        (dst / cls).mkdir(parents=True)
        for f in sorted((src / cls).glob("*.jpg"))[::step][:limit]:
            shutil.copy(f, dst / cls / f.name)
    return classes


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
def _service_data_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Commands that register runs write to a throwaway database, never the checkout's var/."""
    os.environ["MAXMIN_DATA_DIR"] = str(tmp_path_factory.mktemp("service-data"))
    os.environ.pop("DATABASE_URL", None)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The test runs twice: on a fresh SQLite file and on a fresh PostgreSQL database."""
    from tests.service import postgres_database  # it imports this module

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'maxmin.db'}"
    else:
        with postgres_database() as url:
            yield url
