"""The database writer in a process of its own: the answers, the rows and the files it stores,
its errors as the service's own, and its recovery when it dies. SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from app.core.config import Settings
from app.core.db import upgrade
from app.core.storage import ImageStore
from app.core.writer import GroupWriter, WriterProcess, WriterUnavailable
from app.crud.writes import NewImage, NewOutput, PredictionBatch
from tests.helpers import CLASSES, png_bytes, predict_across_a_kill


def _batch(seed: int, label: str | None = "dent") -> PredictionBatch:
    data = png_bytes(seed)
    image = NewImage(hashlib.sha256(data).hexdigest(), data, "image/png", 32, 32, f"p{seed}.png")
    out = NewOutput("baseline", "v1", label, 0.9, {"dent": 0.9}, 1.0)  # type: ignore[arg-type]
    return PredictionBatch([(image, [out])], CLASSES, "line-1", f"part-{seed}")


def test_the_writer_process_stores_as_the_thread_does(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    store = ImageStore(tmp_path / "images")
    writer = WriterProcess(db_url, store.root)
    proc = writer._child.proc
    try:
        assert writer.pid not in (None, os.getpid())
        futures = [writer.submit(_batch(s)) for s in (1, 2, 3, 2)]  # the last: a repeat upload
        written = [f.result(timeout=30) for f in futures]
    finally:
        writer.close()
    stored = [w.predictions[0] for w in written]
    # where each group's time went comes back too: every group ran statements and a commit
    assert all(w.timing.sql > 0 and w.timing.files > 0 for w in written)
    assert len({p.id for p in stored}) == 4 and all(p.id > 0 for p in stored)
    assert [p.part_id for p in stored] == ["part-1", "part-2", "part-3", "part-2"]
    assert stored[0].outputs[0].label == "dent" and stored[0].agree
    assert stored[1].image_sha256 == stored[3].image_sha256
    assert sum(1 for p in store.root.rglob("*") if p.is_file()) == 3  # each image once
    assert writer.pid is None and not proc.is_alive()  # closed: the process ended


def test_its_errors_are_the_service_errors_and_one_bad_request_fails_alone(
    db_url: str, tmp_path: Path
) -> None:
    upgrade(db_url)
    store = ImageStore(tmp_path / "images")
    writer = WriterProcess(db_url, store.root)
    try:
        futures = [writer.submit(b) for b in (_batch(11), _batch(12, None), _batch(13))]
        assert futures[0].result(timeout=30).predictions[0].id > 0
        with pytest.raises(IntegrityError, match="NOT NULL|not-null|null value"):
            futures[1].result(timeout=30)
        assert futures[2].result(timeout=30).predictions[0].id > 0
    finally:
        writer.close()
    assert not store.exists(_batch(12).items[0][0].sha256)  # the failed request left no file
    with pytest.raises(WriterUnavailable, match="stopping"):
        writer.submit(_batch(14))


def test_a_broken_database_is_an_operational_error(tmp_path: Path) -> None:
    """What the service answers with 503 ("database unavailable") arrives as that kind."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'maxmin.db'}"
    upgrade(url)
    writer = WriterProcess(url, tmp_path / "images")
    try:
        assert writer.submit(_batch(21)).result(timeout=30).predictions[0].id == 1
        with sqlite3.connect(tmp_path / "maxmin.db") as conn:
            conn.execute("DROP TABLE model_outputs")
        with pytest.raises(OperationalError, match="no such table"):
            writer.submit(_batch(22)).result(timeout=30)
    finally:
        writer.close()


@pytest.fixture(scope="module")
def run_dir(trained_run: Path) -> Path:
    return trained_run


def test_a_killed_writer_gives_503_then_a_new_one_stores(
    db_url: str,
    run_dir: Path,
    service_client,  # noqa: ANN001
) -> None:
    upload = [("files", ("a.png", png_bytes(3), "image/png"))]
    with service_client(run_dir, db_url, writer_process="true") as client:
        writer = client.app.state.writer
        assert isinstance(writer, WriterProcess)
        assert client.post("/predict", files=upload).status_code == 200
        first = writer.pid
        predict_across_a_kill(client, first, "database writer unavailable")
        deadline = time.monotonic() + 60
        while writer.pid in (None, first) or writer._conn is None:
            assert time.monotonic() < deadline, "no new writer process"
            time.sleep(0.1)
        assert writer.restarts == 1
        metrics = client.get("/metrics").text
        assert "maxmin_writer_process_restarts_total 1.0" in metrics, metrics
        r = client.post("/predict", files=upload)
        assert r.status_code == 200, r.text
        listed = client.get("/predictions").json()
        assert listed["count"] in (2, 3)  # the in-flight one may have been committed
        assert all(set(p["results"]) == {"baseline", "maxmin"} for p in listed["data"])


def test_on_the_cpu_the_writer_is_a_thread_by_default(
    db_url: str,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    service_client,  # noqa: ANN001
) -> None:
    monkeypatch.setenv("MAXMIN_WRITER_PROCESS", "auto")
    assert Settings(writer_process="off").writer_process == "false"
    upload = [("files", ("a.png", png_bytes(5), "image/png"))]
    with service_client(run_dir, db_url) as client:
        assert type(client.app.state.writer) is GroupWriter
        r = client.post("/predict", files=upload)
        assert r.status_code == 200, r.text
        assert client.get("/predictions").json()["count"] == 1


@pytest.mark.parametrize("sync", ["group", "file"])
def test_a_groups_image_files_each_once_and_none_left_when_the_group_fails(
    db_url: str, tmp_path: Path, sync: str
) -> None:
    """A group commit's new image files (one filesystem sync for them all, or one each): each
    stored once with its bytes; when one file cannot be written, the group fails and the files
    the others made are removed again, temporary ones included."""
    from sqlalchemy import func, select

    from app.core.db import make_engine, session_factory, write_lock
    from app.crud.writes import WriteTiming, store_batches
    from app.tables import Prediction

    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    store = ImageStore(tmp_path / "images", sync=sync)
    try:
        batches = [_batch(s) for s in (31, 32, 33, 34, 32)]  # one repeat upload in the group
        timing = WriteTiming()
        with sessions() as session:
            stored = store_batches(session, store, batches, write_lock(db_url), timing)
        assert [p[0].part_id for p in stored] == [f"part-{s}" for s in (31, 32, 33, 34, 32)]
        files = sorted(p for p in store.root.rglob("*") if p.is_file())
        assert len(files) == 4  # each image once, no temporary file left
        for b in batches:
            image = b.items[0][0]
            assert store.path(image.sha256).read_bytes() == image.data
        assert timing.files > 0 and timing.sql > 0

        # A file where one image's folder must go: that image cannot be written.
        good = [_batch(s) for s in range(40, 60)]
        bad = next(
            b
            for b in (_batch(s) for s in range(60, 200))
            if all(b.items[0][0].sha256[:2] != g.items[0][0].sha256[:2] for g in good)
            and not (store.root / b.items[0][0].sha256[:2]).exists()
        )
        (store.root / bad.items[0][0].sha256[:2]).write_bytes(b"not a folder")
        with sessions() as session, pytest.raises(OSError):
            store_batches(session, store, [*good, bad], write_lock(db_url))
        assert sorted(p for p in store.root.rglob("*") if p.is_file()) == sorted(
            [*files, store.root / bad.items[0][0].sha256[:2]]
        )
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Prediction)).scalar_one() == 5
    finally:
        engine.dispose()


def test_where_the_system_refuses_a_filesystem_sync_the_store_syncs_each_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A system-call filter that refuses syncfs (ENOSYS, EPERM) costs speed, not uploads; a
    failed write-back (EIO) fails the group and leaves no file."""
    import ctypes
    import errno

    import app.core.storage as storage

    def refusing(code: int):  # noqa: ANN202
        def syncfs(fd: int) -> int:
            ctypes.set_errno(code)
            return -1

        return syncfs

    images = {hashlib.sha256(d).hexdigest(): d for d in (png_bytes(s) for s in (71, 72, 73))}
    monkeypatch.setattr(storage, "_SYNCFS", refusing(errno.EIO))
    store = storage.ImageStore(tmp_path / "a", sync="group")
    created: list[str] = []
    with pytest.raises(OSError, match="syncing the image store"):
        store.put_many(images, created)
    assert created == [] and not [p for p in store.root.rglob("*") if p.is_file()]

    monkeypatch.setattr(storage, "_SYNCFS", refusing(errno.ENOSYS))
    store = storage.ImageStore(tmp_path / "b", sync="group")
    store.put_many(images, created)
    assert sorted(created) == sorted(images) and store.sync == "file"
    assert all(store.path(sha).read_bytes() == data for sha, data in images.items())
