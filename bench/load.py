"""Load generator: real image uploads to POST /predict at a fixed concurrency, on loopback.

Bounded in time and in count. Reports requests/s, latency p50/p90/p99, errors, and the medians of
the service's Server-Timing parts when it sends them. Usage:
python bench/load.py URL IMAGES_DIR --concurrency 1 8 32 128 --seconds 15 --max-requests 5000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np


def load_images(folder: Path, limit: int = 200) -> list[tuple[str, bytes]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images in {folder}")
    step = max(1, len(files) // limit)
    return [(p.name, p.read_bytes()) for p in files[::step][:limit]]


TRAILER = 8  # bytes appended after the image's end with --distinct


def build_request(
    url: str, name: str, data: bytes, api_key: str | None, distinct: bool = False
) -> tuple[bytes, bytes]:
    """One complete HTTP/1.1 multipart upload, built once and sent many times (keeps the client
    cheap: the client shares the machine's cores with the server under test), as the bytes up to
    the end of the image and the bytes after it. With ``distinct``, each request puts a counter of
    TRAILER bytes between the two: after the image's end marker, where decoders stop reading, so
    the pixels are the same but every upload is a new file for the content-addressed store, as
    every part on a line is."""
    parts = urlparse(url)
    kind = "image/png" if name.endswith(".png") else "image/jpeg"
    boundary = "maxminbench7d3f"
    lead = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
        f'filename="{name}"\r\nContent-Type: {kind}\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(lead) + len(data) + (TRAILER if distinct else 0) + len(tail)
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {length}\r\n" + (f"X-API-Key: {api_key}\r\n" if api_key else "") + "\r\n"
    )
    return head.encode() + lead + data, tail


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bool]:
    """Read one response: status, headers (lower-case names), and whether to keep the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, headers, headers.get("connection", "").lower() != "close"


def _server_timing(value: str, into: dict) -> None:
    for part in value.split(","):
        key, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            into.setdefault(key, []).append(float(rest[4:]))
        elif rest.startswith("desc="):
            into.setdefault(key, []).append(float(rest[5:].strip('"')))


async def _worker(
    host: str,
    port: int,
    requests: list[bytes],
    start: int,
    stop_at: float,
    budget: list[int],
    out: dict,
    distinct: Iterator[int] | None = None,
) -> None:
    i = start
    conn = None
    while time.perf_counter() < stop_at and budget[0] > 0:
        budget[0] -= 1
        front, tail = requests[i % len(requests)]
        i += 1
        counter = next(distinct) if distinct is not None else None
        request = front + (counter.to_bytes(TRAILER, "big") if counter is not None else b"") + tail
        t0 = time.perf_counter()
        ok, headers = False, {}
        try:
            if conn is None:
                conn = await asyncio.open_connection(host, port)
            reader, writer = conn
            writer.write(request)
            status, headers, keep = await asyncio.wait_for(_response(reader), timeout=60)
            ok = status == 200
            if not keep:
                writer.close()
                conn = None
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            if conn is not None:
                conn[1].close()
            conn = None
        out["latency"].append((time.perf_counter() - t0) * 1000)
        if not ok:
            out["errors"] += 1
            continue
        if "server-timing" in headers:
            _server_timing(headers["server-timing"], out["timing"])
    if conn is not None:
        conn[1].close()


async def _load(
    url: str,
    images: list[tuple[str, bytes]],
    concurrency: int,
    seconds: float,
    max_requests: int,
    distinct: bool = False,
) -> dict:
    """One process's share: raw latencies, errors, Server-Timing parts, elapsed seconds."""
    parts = urlparse(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the load generator only targets loopback")
    out: dict = {"latency": [], "errors": 0, "timing": {}}
    key = os.environ.get("MAXMIN_API_KEY")
    requests = [build_request(url, name, data, key, distinct) for name, data in images]
    host, port = parts.hostname, parts.port or 80
    # Distinct uploads: a counter from a random 62-bit start, so client processes and runs never
    # meet in practice.
    counter = itertools.count(secrets.randbits(62)) if distinct else None
    warm: dict = {"latency": [], "errors": 0, "timing": {}}
    await _worker(host, port, requests, 0, time.perf_counter() + 30, [1], warm, counter)
    budget = [max_requests]
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(
        *[
            _worker(host, port, requests, k * 7, stop_at, budget, out, counter)
            for k in range(concurrency)
        ]
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
    distinct: bool = False,
) -> dict:
    """Keep ``concurrency`` requests in flight (spread over ``procs`` client processes, so the
    client is never the bottleneck) until the time or the request budget runs out."""
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if k < concurrency % procs else 0) for k in range(procs)]
    jobs = [(url, images, c, seconds, max_requests // procs, distinct) for c in shares]
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
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="make every upload a new file (same pixels), as on a line; default: the images "
        "repeat, so the store writes each file once",
    )
    args = parser.parse_args()
    images = load_images(args.images)
    for c in args.concurrency:
        row = run_load(
            args.url, images, c, args.seconds, args.max_requests, args.procs, args.distinct
        )
        row["distinct"] = args.distinct
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
