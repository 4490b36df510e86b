"""Load generator: real image uploads to POST /predict at a fixed concurrency, on loopback.

Bounded in time and in count. Reports requests/s, latency p50/p90/p99, errors, and the medians of
the service's Server-Timing parts when it sends them. Usage:
python bench/load.py URL IMAGES_DIR --concurrency 1 8 32 128 --seconds 15 --max-requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np


def load_images(folder: Path, limit: int = 200) -> list[tuple[str, bytes]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images in {folder}")
    step = max(1, len(files) // limit)
    return [(p.name, p.read_bytes()) for p in files[::step][:limit]]


async def _worker(
    client: httpx.AsyncClient,
    url: str,
    images: list[tuple[str, bytes]],
    start: int,
    stop_at: float,
    budget: list[int],
    out: dict,
) -> None:
    i = start
    while time.perf_counter() < stop_at and budget[0] > 0:
        budget[0] -= 1
        name, data = images[i % len(images)]
        i += 1
        kind = "image/png" if name.endswith(".png") else "image/jpeg"
        t0 = time.perf_counter()
        try:
            r = await client.post(url, files=[("files", (name, data, kind))])
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok, r = False, None
        out["latency"].append((time.perf_counter() - t0) * 1000)
        if not ok:
            out["errors"] += 1
            continue
        timing = r.headers.get("server-timing")
        if timing:
            for part in timing.split(","):
                key, _, rest = part.strip().partition(";")
                if rest.startswith("dur="):
                    out["timing"].setdefault(key, []).append(float(rest[4:]))
                elif rest.startswith("desc="):
                    out["timing"].setdefault(key, []).append(float(rest[5:].strip('"')))


async def _load(
    url: str, images: list[tuple[str, bytes]], concurrency: int, seconds: float, max_requests: int
) -> dict:
    """One process's share: raw latencies, errors, Server-Timing parts, elapsed seconds."""
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the load generator only targets loopback")
    out: dict = {"latency": [], "errors": 0, "timing": {}}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"X-API-Key": os.environ["MAXMIN_API_KEY"]} if "MAXMIN_API_KEY" in os.environ else {}
    async with httpx.AsyncClient(limits=limits, timeout=60, headers=headers) as client:
        await client.post(url, files=[("files", (images[0][0], images[0][1], "image/jpeg"))])
        budget = [max_requests]
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(
            *[_worker(client, url, images, k * 7, stop_at, budget, out) for k in range(concurrency)]
        )
        out["elapsed"] = time.perf_counter() - t0
    return out


def _child(args: tuple) -> dict:
    return asyncio.run(_load(*args))


def run_load(
    url: str,
    images: list[tuple[str, bytes]],
    concurrency: int,
    seconds: float,
    max_requests: int,
    procs: int = 1,
) -> dict:
    """Keep ``concurrency`` requests in flight (spread over ``procs`` client processes, so the
    client is never the bottleneck) until the time or the request budget runs out."""
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if k < concurrency % procs else 0) for k in range(procs)]
    jobs = [(url, images, c, seconds, max_requests // procs) for c in shares]
    if procs == 1:
        parts = [_child(jobs[0])]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(procs) as pool:
            parts = pool.map(_child, jobs)
    out = {
        "latency": [x for p in parts for x in p["latency"]],
        "errors": sum(p["errors"] for p in parts),
        "timing": {},
    }
    for p in parts:
        for k, v in p["timing"].items():
            out["timing"].setdefault(k, []).extend(v)
    elapsed = max(p["elapsed"] for p in parts)
    lat = np.asarray(out["latency"])
    done = len(lat) - out["errors"]
    return {
        "concurrency": concurrency,
        "client_processes": procs,
        "requests": int(len(lat)),
        "errors": out["errors"],
        "seconds": round(elapsed, 2),
        "requests_per_s": round(done / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "p90_ms": round(float(np.percentile(lat, 90)), 2) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "server_timing_median_ms": {
            k: round(statistics.median(v), 3) for k, v in out["timing"].items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("images", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--procs", type=int, default=1, help="client processes")
    args = parser.parse_args()
    images = load_images(args.images)
    for c in args.concurrency:
        row = run_load(args.url, images, c, args.seconds, args.max_requests, args.procs)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
