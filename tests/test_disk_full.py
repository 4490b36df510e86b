"""A full image store: 503 with a clear detail, nothing half-written, recovery once space is back.

The image store sits on a real, tiny tmpfs (this needs root, as in CI; skipped elsewhere).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.config import Settings
from app.core.db import upgrade
from app.main import create_app
from app.tables import Prediction, StoredImage
from tests.helpers import jpeg_bytes, make_key


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_gives_503_then_recovers(
    small_disk: Path, tmp_path: Path, trained_run: Path
) -> None:
    run_dir = trained_run
    url = (
        f"sqlite:///{tmp_path / 'db' / 'maxmin.db'}"  # the database is elsewhere; only images fill
    )
    upgrade(url)
    settings = Settings(data_dir=small_disk, database_url=url, run_dir=run_dir, device="cpu")
    with TestClient(create_app(settings), headers={"X-API-Key": make_key(url)}) as client:
        assert (
            client.post(
                "/predict", files=[("files", ("a.jpg", jpeg_bytes(1), "image/jpeg"))]
            ).status_code
            == 200
        )
        filler = small_disk / "filler"
        with filler.open("wb", buffering=0) as fh:  # take every byte that is left
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        image = jpeg_bytes(2, size=96)
        r = client.post("/predict", files=[("files", ("b.jpg", image, "image/jpeg"))])
        assert r.status_code == 503 and "storage is full" in r.json()["detail"]
        engine = client.app.state.engine
        with engine.connect() as conn:
            rows = conn.execute(select(func.count()).select_from(Prediction)).scalar_one()
            images = conn.execute(select(func.count()).select_from(StoredImage)).scalar_one()
        assert (rows, images) == (1, 1)  # nothing half-written
        assert not client.app.state.store.exists(hashlib.sha256(image).hexdigest())
        # Two new images in one request: one group of files under one filesystem sync.
        pair = [jpeg_bytes(3, size=96), jpeg_bytes(4, size=96)]
        r = client.post(
            "/predict",
            files=[("files", (f"{k}.jpg", data, "image/jpeg")) for k, data in enumerate(pair)],
        )
        assert r.status_code == 503 and "storage is full" in r.json()["detail"]
        store = client.app.state.store
        assert not any(store.exists(hashlib.sha256(data).hexdigest()) for data in pair)
        assert not list(small_disk.rglob(".tmp-*"))  # no temporary file left behind
        filler.unlink()
        r = client.post("/predict", files=[("files", ("b.jpg", image, "image/jpeg"))])
        assert r.status_code == 200
        r = client.post(
            "/predict",
            files=[("files", (f"{k}.jpg", data, "image/jpeg")) for k, data in enumerate(pair)],
        )
        assert r.status_code == 200
        assert all(store.path(hashlib.sha256(d).hexdigest()).read_bytes() == d for d in pair)
