"""The cross-process write lock for SQLite: what it locks, that it excludes other processes, and
that several worker processes writing through it store every prediction, each under its own
request."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from contextlib import nullcontext
from hashlib import sha256
from pathlib import Path

from sqlalchemy import text

from app.core.db import SqliteWriteLock, make_engine, session_factory, upgrade, write_lock
from app.core.storage import ImageStore
from app.core.writer import GroupWriter
from app.crud.writes import NewImage, NewOutput, PredictionBatch

CLASSES = ["good", "scratch"]


def test_only_sqlite_files_get_a_lock(tmp_path: Path) -> None:
    assert isinstance(write_lock("postgresql+psycopg://u@127.0.0.1:5432/db"), nullcontext)
    assert isinstance(write_lock("sqlite://"), nullcontext)
    assert isinstance(write_lock("sqlite:///:memory:"), nullcontext)
    lock = write_lock(f"sqlite:///{tmp_path}/maxmin.db")
    assert isinstance(lock, SqliteWriteLock)
    assert lock.path == tmp_path / "maxmin.db-writelock"


def _hold(path: str, held, released, hold_s: float) -> None:  # noqa: ANN001
    with SqliteWriteLock(Path(path)):
        held.set()
        time.sleep(hold_s)
        released.value = 1


def test_the_lock_excludes_another_process(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    held, released = ctx.Event(), ctx.Value("i", 0)
    path = tmp_path / "db-writelock"
    child = ctx.Process(target=_hold, args=(str(path), held, released, 0.5))
    child.start()
    try:
        assert held.wait(60), "the child never took the lock"
        lock = SqliteWriteLock(path)
        with lock:
            # Only reachable once the child has let go.
            assert released.value == 1
        lock.close()
    finally:
        child.join(30)
    assert child.exitcode == 0


def _batch(worker: int, client: int, i: int) -> PredictionBatch:
    data = f"image {i % 5}".encode()  # shared images: the store keeps each once
    name = f"w{worker}-c{client}-{i}.png"
    outputs = [
        NewOutput(m, f"{m}:v", CLASSES[i % 2], 0.9, {"good": 0.9, "scratch": 0.1}, 0.5)
        for m in ("baseline", "maxmin")
    ]
    return PredictionBatch(
        [(NewImage(sha256(data).hexdigest(), data, "image/png", 8, 8, name), outputs)],
        CLASSES,
        f"w{worker}",
        None,
    )


def _worker(url: str, images: str, worker: int, clients: int, each: int) -> list[str]:
    """A web worker's writer with concurrent clients; returns what went wrong, if anything."""
    engine = make_engine(url)
    writer = GroupWriter(
        session_factory(engine), ImageStore(Path(images)), write_lock=write_lock(url)
    )
    problems: list[str] = []

    def client(c: int) -> None:
        for i in range(each):
            try:
                preds = writer.submit(_batch(worker, c, i)).result(timeout=60).predictions
            except Exception as exc:  # noqa: BLE001 - reported to the test
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            if [p.filename for p in preds] != [f"w{worker}-c{c}-{i}.png"]:
                problems.append(f"request w{worker}-c{c}-{i} got {preds}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    engine.dispose()
    return problems


def test_workers_writing_through_the_lock_store_every_prediction(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/maxmin.db"
    upgrade(url)
    workers, clients, each = 3, 4, 15
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.starmap(
            _worker, [(url, str(tmp_path / "images"), w, clients, each) for w in range(workers)]
        )
    assert [p for r in results for p in r] == []
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT source, filename FROM predictions ORDER BY source, filename")
        ).all()
        outputs = conn.execute(text("SELECT count(*) FROM model_outputs")).scalar_one()
        images = conn.execute(text("SELECT count(*) FROM images")).scalar_one()
    engine.dispose()
    expected = sorted(
        (f"w{w}", f"w{w}-c{c}-{i}.png")
        for w in range(workers)
        for c in range(clients)
        for i in range(each)
    )
    assert sorted(tuple(r) for r in rows) == expected  # none lost, none twice, none crossed
    assert outputs == 2 * len(expected)
    assert images == 5
    assert len([p for p in (tmp_path / "images").rglob("*") if p.is_file()]) == 5
