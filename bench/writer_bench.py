"""Prediction writes from a busy web worker: the writer thread beside the worker's Python work
(``GroupWriter``) against the writer in a process of its own (``WriterProcess``), side by side.

Each worker is a process with concurrent client threads that each store one image's A/B
prediction and wait for it, as ``/predict`` requests do, and a thread that keeps the worker's
GIL busy for a set share of the time, as a loaded event loop does (parsing, decoding, answering).
Reports predictions/s and the write latency per request (p50/p90/p99) for each way, alternating
the ways in each repeat; SQLite with the service's write lock. Usage:
python bench/writer_bench.py --workers 1 --clients 16 --busy 0 0.7 --seconds 4 --repeats 3
python bench/writer_bench.py --one-group   (one writer thread's groups, alone and beside a spinner)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from db_bench import (  # noqa: E402
    _batch,
    _images,
    drive,
    medians,
    outcome,
    write_results,
)

from app.core.db import make_engine, session_factory, upgrade, write_lock  # noqa: E402
from app.core.storage import ImageStore  # noqa: E402
from app.core.writer import GroupWriter, WriterProcess  # noqa: E402

WAYS = ("thread", "process")


def _busy(stop: threading.Event, share: float, period_s: float = 0.003) -> None:
    """Hold the GIL for ``share`` of each period in pure Python, sleep for the rest."""
    while not stop.is_set():
        until = time.perf_counter() + share * period_s
        while time.perf_counter() < until:
            sum(range(200))
        if share < 1:
            time.sleep((1 - share) * period_s)


def _worker(
    url: str, images_dir: str, way: str, clients: int, busy: float, seconds: float, start: float
):  # noqa: ANN202
    engine = make_engine(url)
    if way == "process":
        writer = WriterProcess(url, Path(images_dir))
    else:
        writer = GroupWriter(
            session_factory(engine), ImageStore(Path(images_dir)), write_lock=write_lock(url)
        )
    stop = threading.Event()
    spinner = threading.Thread(target=_busy, args=(stop, busy), daemon=True)
    result = drive(
        writer, clients, seconds, start, _images(400), 37, spinner.start if busy > 0 else None
    )
    stop.set()
    writer.close()
    engine.dispose()
    return result


def run_once(way: str, workers: int, clients: int, busy: float, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/maxmin.db"
        upgrade(url)
        # Not a multiprocessing Pool: its processes are daemons, which cannot start a writer.
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            start = time.perf_counter() + 5.0  # every worker and writer started by then
            jobs = [
                pool.submit(_worker, url, f"{tmp}/images", way, clients, busy, seconds, start)
                for _ in range(workers)
            ]
            parts = [j.result(timeout=seconds + 120) for j in jobs]
        stored = outcome(url, parts, seconds)
    return {"way": way, "busy": busy, "workers": workers, "clients_per_worker": clients, **stored}


class _TimedLock:
    """The service's write lock, timing how long each holder keeps it."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner, self.held = inner, []

    def __enter__(self) -> None:
        self.inner.__enter__()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.held.append((time.perf_counter() - self.t0) * 1000)
        self.inner.__exit__(*exc)


def one_group(spin: bool, groups: int = 20, size: int = 8) -> dict:
    """A writer thread storing groups of ``size`` predictions, alone or beside one thread that
    spins in pure Python: median time per group and time the write lock was held."""
    from app.crud.writes import store_batches

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/maxmin.db"
        upgrade(url)
        engine = make_engine(url)
        sessions, store = session_factory(engine), ImageStore(Path(tmp) / "images")
        lock = _TimedLock(write_lock(url))
        blobs, rng = _images(groups * size), random.Random(0)
        stop = threading.Event()
        if spin:
            threading.Thread(target=_busy, args=(stop, 1.0), daemon=True).start()
        took = []
        for g in range(groups):
            batches = [_batch(blobs[g * size + i], rng) for i in range(size)]
            t0 = time.perf_counter()
            with sessions() as session:
                store_batches(session, store, batches, lock)
            took.append((time.perf_counter() - t0) * 1000)
        stop.set()
        engine.dispose()
    return {
        "beside": "a spinning thread" if spin else "nothing",
        "group_size": size,
        "ms_per_group": round(statistics.median(took), 2),
        "ms_lock_held": round(statistics.median(lock.held), 2),
        "switch_interval_ms": sys.getswitchinterval() * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8, help="concurrent requests per worker")
    parser.add_argument(
        "--busy",
        type=float,
        nargs="+",
        default=[0.0, 0.7],
        help="share of the time each worker's own Python work holds its GIL",
    )
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--one-group",
        action="store_true",
        help="only time one writer thread's groups of 8, alone and beside a spinning thread",
    )
    args = parser.parse_args()
    if args.one_group:
        for spin in (False, True):
            print(json.dumps(one_group(spin)), flush=True)
        return
    runs, summary = [], []
    for busy in args.busy:
        per_way: dict[str, list[dict]] = {w: [] for w in WAYS}
        for r in range(args.repeats):
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                row = run_once(way, args.workers, args.clients, busy, args.seconds)
                print(json.dumps(row), flush=True)
                runs.append(row)
                per_way[way].append(row)
        med = medians(per_way)
        line = {
            "busy": busy,
            "workers": args.workers,
            "clients_per_worker": args.clients,
            "median": med,
            "process_over_thread": round(
                med["process"]["predictions_per_s"] / med["thread"]["predictions_per_s"], 2
            ),
        }
        print(json.dumps(line), flush=True)
        summary.append(line)
    write_results(args, runs, summary)


if __name__ == "__main__":
    main()
