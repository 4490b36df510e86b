"""The statements of one group commit on SQLite: this project's SQLAlchemy Core path
(``app.crud.writes.store_batches``, its ``db_sql`` part) against the same rows written through
Python's ``sqlite3`` directly, the floor a hand-written, SQLite-only path could reach.

On SQLite every worker's writer holds the cross-process write lock for exactly this time, so it
bounds the service's write rate at many workers. Groups of each size alternate between the two
ways on one database; each group is new predictions of new images, as on a line. Before timing,
one group written each way is read back through the ORM and compared, so both ways write the
same rows. Reports medians per group (ms), the direct path's split into statements and commit,
the ratio, and the 99th percentiles. Usage:
python bench/sql_bench.py --groups 1 8 32 --count 400 [--no-autocheckpoint] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from db_bench import _batch  # noqa: E402
from sqlalchemy import event  # noqa: E402

from app.core.db import make_engine, session_factory, upgrade  # noqa: E402
from app.core.storage import ImageStore  # noqa: E402
from app.crud import writes as crud  # noqa: E402
from app.crud.predictions import get_prediction  # noqa: E402
from app.tables import utcnow  # noqa: E402


def _when(dt: datetime) -> str:
    """The text SQLAlchemy's SQLite dialect stores for a DateTime."""
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f")


def direct(session, batches: list[crud.PredictionBatch]) -> tuple[list[int], float, float]:  # noqa: ANN001
    """The group's rows through sqlite3 itself: returns the new ids, statements' and commit's
    seconds. Rows are prepared before the clock starts, as ``store_batches`` does."""
    now = _when(utcnow())
    images, preds, outs = {}, [], []
    for b in batches:
        classes = json.dumps(b.classes)
        for image, outputs in b.items:
            images.setdefault(
                image.sha256,
                (image.sha256, image.content_type, len(image.data), image.width, image.height, now),
            )
            agree = len({o.label for o in outputs}) == 1
            preds += [image.sha256, b.source, b.part_id, image.filename, classes, agree, now]
            outs.append(outputs)
    values = ",".join(["(?,?,?,?,?,?,?)"] * len(outs))
    conn = session.connection().connection.dbapi_connection
    t0 = time.perf_counter()
    cur = conn.cursor()
    cur.executemany(
        "INSERT OR IGNORE INTO images (sha256, content_type, size_bytes, width, height, "
        "created_at) VALUES (?,?,?,?,?,?)",
        list(images.values()),
    )
    ids = [
        row[0]
        for row in cur.execute(
            "INSERT INTO predictions (image_sha256, source, part_id, filename, classes, agree, "
            f"created_at) VALUES {values} RETURNING id",
            preds,
        ).fetchall()
    ]
    cur.executemany(
        "INSERT INTO model_outputs (prediction_id, model_name, model_version, label, "
        "confidence, probabilities, latency_ms) VALUES (?,?,?,?,?,?,?)",
        [
            (
                pid,
                o.model_name,
                o.model_version,
                o.label,
                o.confidence,
                json.dumps(o.probabilities),
                o.latency_ms,
            )
            for pid, outputs in zip(ids, outs, strict=True)
            for o in outputs
        ],
    )
    t1 = time.perf_counter()
    conn.commit()
    t2 = time.perf_counter()
    session.commit()  # ends the session's transaction on the same connection
    return ids, t1 - t0, t2 - t1


def _same_rows(session, a: int, b: int) -> None:  # noqa: ANN001
    """Predictions ``a`` and ``b`` (one per way, same input) read back the same."""

    def view(pid: int) -> dict:
        p = get_prediction(session, pid)
        return {
            "image": p.image_sha256,
            "source": p.source,
            "filename": p.filename,
            "classes": p.classes,
            "agree": p.agree,
            "created": type(p.created_at),
            "outputs": [
                (
                    o.model_name,
                    o.model_version,
                    o.label,
                    o.confidence,
                    o.probabilities,
                    o.latency_ms,
                )
                for o in p.outputs
            ],
        }

    if view(a) != view(b):
        raise SystemExit(f"the two ways wrote different rows:\n{view(a)}\n{view(b)}")


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 8, 32], help="group sizes")
    parser.add_argument("--count", type=int, default=400, help="groups per size and way")
    parser.add_argument(
        "--no-autocheckpoint",
        action="store_true",
        help="turn SQLite's automatic checkpoint off (the WAL then only grows): shows its share "
        "of the tail",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.sqlite"
        upgrade(url)
        engine = make_engine(url)
        if args.no_autocheckpoint:
            event.listen(
                engine, "connect", lambda conn, _: conn.execute("PRAGMA wal_autocheckpoint=0")
            )
        session = session_factory(engine)()
        store = ImageStore(Path(tmp) / "images")

        def group(n: int) -> list[crud.PredictionBatch]:
            return [_batch(rng.randbytes(64), rng) for _ in range(n)]

        g = group(1)
        ours = crud.store_batches(session, store, g)[0][0].id
        theirs = direct(session, g)[0][0]
        _same_rows(session, ours, theirs)
        summary = []
        for n in args.groups:
            times: dict[str, list[float]] = {
                "sqlalchemy": [],
                "sqlite3": [],
                "statements": [],
                "commit": [],
            }
            for _ in range(args.count):
                timing = crud.WriteTiming()
                crud.store_batches(session, store, group(n), timing=timing)
                times["sqlalchemy"].append(timing.sql)
                _, statements, commit = direct(session, group(n))
                times["sqlite3"].append(statements + commit)
                times["statements"].append(statements)
                times["commit"].append(commit)
            med = {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
            row = {
                "group": n,
                **{f"{k}_ms": v for k, v in med.items()},
                "sqlalchemy_over_sqlite3": round(med["sqlalchemy"] / med["sqlite3"], 2),
                # the tail: SQLite's automatic checkpoint (its WAL written back into the
                # database file, with syncs) runs inside a commit once the WAL holds 1,000 pages
                **{f"{k}_p99_ms": round(_p99(v) * 1e3, 3) for k, v in times.items()},
            }
            summary.append(row)
            print(
                f"group {n:3d}: SQLAlchemy {med['sqlalchemy']:.3f} ms, sqlite3 "
                f"{med['sqlite3']:.3f} ms (statements {med['statements']:.3f}, commit "
                f"{med['commit']:.3f}), ratio {row['sqlalchemy_over_sqlite3']:.2f}; p99 "
                f"{row['sqlalchemy_p99_ms']:.3f} and {row['sqlite3_p99_ms']:.3f} ms"
            )
        session.close()
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "machine": platform.processor() or platform.machine(),
                    "count": args.count,
                    "autocheckpoint": not args.no_autocheckpoint,
                    "summary": summary,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
