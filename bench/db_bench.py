"""Prediction writes from several web workers into one SQLite file, side by side: SQLite's busy
timeout alone against the service's cross-process write lock (``app.core.db.write_lock``), and
a sync per new image file against one sync of the filesystem per group commit
(``MAXMIN_IMAGE_SYNC``).

Each worker is a process with the service's own ``GroupWriter`` (group commit, bulk inserts, the
image store) fed by client threads that each store one image's A/B prediction and wait for it,
as concurrent ``/predict`` requests do. Reports predictions/s and the write latency per request
(p50/p90/p99) for each way, alternating the ways in each repeat. No models, no HTTP: only the
database path. ``--new-images`` makes every request's image a new file, as on a line (otherwise
200 images repeat, and the store writes each once); ``--neighbour-mb-s`` adds another program
writing to the same filesystem meanwhile. Usage:
python bench/db_bench.py --workers 4 8 --clients 8 --seconds 5 --repeats 3 [--out FILE]
python bench/db_bench.py --ways write-lock,group-sync --new-images
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
from contextlib import nullcontext
from hashlib import sha256
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.db import make_engine, session_factory, upgrade, write_lock  # noqa: E402
from app.core.storage import ImageStore  # noqa: E402
from app.core.writer import GroupWriter  # noqa: E402
from app.crud.writes import NewImage, NewOutput, PredictionBatch  # noqa: E402

CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


def _images(count: int = 200, size: int = 8000) -> list[bytes]:
    """Distinct blobs the size of a NEU JPEG (the store keeps each once, as the service does)."""
    return [random.Random(i).randbytes(size) for i in range(count)]


def _batch(data: bytes, rng: random.Random) -> PredictionBatch:
    outputs = []
    for name in ("baseline", "maxmin"):
        p = np.asarray([rng.random() for _ in CLASSES])
        p /= p.sum()
        k = int(p.argmax())
        outputs.append(
            NewOutput(
                model_name=name,
                model_version=f"{name}.safetensors:0123456789ab",
                label=CLASSES[k],
                confidence=float(p[k]),
                probabilities={c: round(float(v), 6) for c, v in zip(CLASSES, p, strict=True)},
                latency_ms=0.5,
            )
        )
    image = NewImage(sha256(data).hexdigest(), data, "image/jpeg", 200, 200, "part.jpg")
    return PredictionBatch([(image, outputs)], CLASSES, "bench", None)


def drive(
    writer,  # noqa: ANN001 - anything with the writers' submit(batch) -> Future
    clients: int,
    seconds: float,
    start: float,
    blobs: list[bytes],
    stride: int = 7,
    on_start=None,  # noqa: ANN001
    new_images: bool = False,
) -> tuple[list[float], int]:
    """From ``start`` for ``seconds``: ``clients`` threads that each store one image's prediction
    and wait for it, as concurrent requests do; with ``new_images`` each a new file (the blob
    with a suffix). Returns the latencies (ms) and the errors."""
    tag = f"{threading.get_ident()}-{time.time_ns()}"  # unique per process and run
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0]

    def client(k: int) -> None:
        rng = random.Random(k)
        i = k * stride
        while time.perf_counter() < start + seconds:
            data = blobs[i % len(blobs)]
            batch = _batch(data + f"{tag}-{k}-{i}".encode() if new_images else data, rng)
            i += 1
            t0 = time.perf_counter()
            try:
                writer.submit(batch).result(timeout=60)
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors[0] += 1
                continue
            latencies[k].append((time.perf_counter() - t0) * 1000)

    time.sleep(max(0.0, start - time.perf_counter()))
    if on_start is not None:
        on_start()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [x for lat in latencies for x in lat], errors[0]


# name: (the write lock taken, how new image files are synced)
WAYS = {
    "busy-timeout": (False, "file"),
    "write-lock": (True, "file"),
    "group-sync": (True, "group"),
}


def _worker(
    url: str,
    images_dir: str,
    way: str,
    clients: int,
    seconds: float,
    start: float,
    new: bool,
):  # noqa: ANN202
    """One web worker's writer and its clients; returns request latencies (ms) and errors."""
    locked, sync = WAYS[way]
    engine = make_engine(url)
    writer = GroupWriter(
        session_factory(engine),
        ImageStore(Path(images_dir), sync),
        write_lock=write_lock(url) if locked else nullcontext(),
    )
    result = drive(writer, clients, seconds, start, _images(), new_images=new)
    writer.close()
    engine.dispose()
    return result


STATS = ("predictions_per_s", "p50_ms", "p90_ms", "p99_ms")


def latency_stats(latencies_ms: list[float], seconds: float) -> dict:
    """Predictions per second and write latency percentiles of one run."""
    lat = np.asarray(latencies_ms or [float("nan")])
    return {
        "predictions_per_s": round(len(latencies_ms) / seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p90_ms": round(float(np.percentile(lat, 90)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
    }


def medians(per_way: dict[str, list[dict]]) -> dict:
    return {
        way: {k: round(statistics.median(r[k] for r in rows), 2) for k in STATS}
        for way, rows in per_way.items()
    }


def write_results(args: argparse.Namespace, runs: list[dict], summary: list[dict]) -> None:
    if args.out:
        args.out.write_text(
            json.dumps(
                {"args": vars(args) | {"out": str(args.out)}, "runs": runs, "summary": summary},
                indent=1,
            )
        )


def _neighbour(path: str, mb_per_s: float, until: float) -> None:
    """Another program writing ``mb_per_s`` MB/s to the same filesystem (no syncs of its own),
    rewriting one file of at most 256 MB, until ``until`` (``time.time()``)."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as fh:
        written, t0 = 0, time.time()
        while time.time() < until:
            if written % 256 == 0:
                fh.seek(0)
            fh.write(chunk)
            written += 1
            time.sleep(max(0.0, t0 + written / mb_per_s - time.time()))


def run_once(
    workers: int,
    clients: int,
    seconds: float,
    way: str,
    new: bool = False,
    neighbour_mb_s: float = 0.0,
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/maxmin.db"
        upgrade(url)
        ctx = mp.get_context("spawn")
        if neighbour_mb_s > 0:
            until = time.time() + 3.0 + seconds + 1.0
            args = (f"{tmp}/neighbour", neighbour_mb_s, until)
            ctx.Process(target=_neighbour, args=args, daemon=True).start()
        with ctx.Pool(workers) as pool:
            start = time.perf_counter() + 3.0  # every worker imported and connected by then
            jobs = [
                pool.apply_async(
                    _worker,
                    (url, f"{tmp}/images", way, clients, seconds, start, new),
                )
                for _ in range(workers)
            ]
            parts = [j.get(timeout=seconds + 120) for j in jobs]
        stored = outcome(url, parts, seconds)
    return {
        "way": way,
        "image_sync": WAYS[way][1],
        "neighbour_mb_per_s": neighbour_mb_s,
        "new_images": new,
        "workers": workers,
        "clients_per_worker": clients,
        **stored,
    }


def outcome(url: str, parts: list, seconds: float) -> dict:
    """The workers' latencies and errors, and the rows the database holds at the end."""
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar_one()
    engine.dispose()
    lat = [x for p in parts for x in p[0]]
    return {
        "predictions": len(lat),
        "rows_stored": int(rows),
        "errors": sum(p[1] for p in parts),
        **latency_stats(lat, seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--clients", type=int, default=8, help="concurrent requests per worker")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ways",
        default="busy-timeout,write-lock",
        help=f"comma-separated, the first is the reference: {', '.join(WAYS)}",
    )
    parser.add_argument("--new-images", action="store_true", help="every request a new file")
    parser.add_argument(
        "--neighbour-mb-s",
        type=float,
        default=0.0,
        help="another program writing this many MB/s to the same filesystem meanwhile",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in ways if w not in WAYS]
    if unknown or not ways:
        parser.error(f"unknown ways {unknown}; choose from {', '.join(WAYS)}")
    runs, summary = [], []
    for workers in args.workers:
        per_way: dict[str, list[dict]] = {w: [] for w in ways}
        for r in range(args.repeats):
            for way in ways if r % 2 == 0 else ways[::-1]:
                row = run_once(
                    workers, args.clients, args.seconds, way, args.new_images, args.neighbour_mb_s
                )
                print(json.dumps(row), flush=True)
                runs.append(row)
                per_way[way].append(row)
        med = medians(per_way)
        first = med[ways[0]]["predictions_per_s"]
        line = {
            "workers": workers,
            "clients_per_worker": args.clients,
            "new_images": args.new_images,
            "median": med,
            "ratio_predictions_per_s": {
                w: round(med[w]["predictions_per_s"] / first, 2) for w in ways[1:]
            },
        }
        print(json.dumps(line), flush=True)
        summary.append(line)
    write_results(args, runs, summary)


if __name__ == "__main__":
    main()
