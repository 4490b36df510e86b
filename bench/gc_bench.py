"""How long one full garbage collection takes in a started service, with and without gc.freeze().

Starts the app in-process (models loaded, database migrated, like `serve`), then times full
collections (gc.collect()) with every long-lived object thawed, and again frozen, as the service
leaves them after start-up. Usage: python bench/gc_bench.py RUN_DIR [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import upgrade
from app.main import create_app


def _full_collections(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/maxmin.db"
        upgrade(url)
        settings = Settings(data_dir=Path(tmp), database_url=url, run_dir=args.run_dir)
        with TestClient(create_app(settings)):
            gc.unfreeze()
            thawed = _full_collections(args.repeats)
            objects = len(gc.get_objects())
            gc.freeze()
            frozen = _full_collections(args.repeats)
    print(
        json.dumps(
            {
                "tracked_objects": objects,
                "full_collection_ms_thawed": round(statistics.median(thawed), 1),
                "full_collection_ms_frozen": round(statistics.median(frozen), 1),
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
