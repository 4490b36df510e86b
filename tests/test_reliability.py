"""Under concurrent load, and across a SIGKILL, nothing acknowledged is lost, crossed or orphaned.

A real server process (`maxmin-inspect serve`) on loopback, 16 client threads for a bounded time,
against SQLite and against PostgreSQL. Every check reads the database and the image store directly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, func, select

from app.core.storage import ImageStore
from app.tables import LabelEvent, ModelOutput, Prediction, StoredImage
from tests.helpers import (
    CLASSES,
    encoded,
    free_port,
    malformed_corpus,
    png_bytes,
    server,
)

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 16


@pytest.fixture(scope="module")
def run_dir(trained_run: Path) -> Path:
    return trained_run


def _load(
    base: str, key: str, seconds: float, acked: dict, stop: threading.Event
) -> list[threading.Thread]:
    """Clients that predict (some images repeated) and label; ``acked`` records every 2xx."""
    lock = threading.Lock()

    def client(k: int) -> None:
        deadline = time.monotonic() + seconds
        with httpx.Client(timeout=30, headers={"X-API-Key": key}) as http:
            i = 0
            while time.monotonic() < deadline and not stop.is_set():
                seed = 1000 * k + (i % 7)  # every 7th upload repeats an image
                i += 1
                try:
                    r = http.post(
                        f"{base}/predict",
                        files=[("files", (f"{k}-{i}.png", png_bytes(seed), "image/png"))],
                    )
                    if r.status_code != 200:
                        continue
                    pred = r.json()["data"][0]
                    with lock:
                        acked[pred["id"]] = {"sha": pred["image_sha256"], "label": None}
                    label = CLASSES[(k + i) % len(CLASSES)]
                    r = http.put(
                        f"{base}/predictions/{pred['id']}/label",
                        json={"label": label, "labelled_by": f"client-{k}"},
                    )
                    if r.status_code == 200:
                        with lock:
                            acked[pred["id"]]["label"] = (label, f"client-{k}")
                except httpx.HTTPError:
                    continue  # the server may be killed under us

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    return threads


def _check_consistent(db_url: str, store: ImageStore, acked: dict) -> dict[str, int]:
    """Every acknowledged row is there with its image and its own label; nothing orphaned."""
    engine = create_engine(db_url)
    with engine.connect() as conn:
        preds = {row.id: row for row in conn.execute(select(Prediction.__table__))}
        images = {row.sha256 for row in conn.execute(select(StoredImage.sha256))}
        outputs = dict(
            conn.execute(
                select(ModelOutput.prediction_id, func.count()).group_by(ModelOutput.prediction_id)
            ).all()
        )
        events = conn.execute(select(func.count()).select_from(LabelEvent)).scalar_one()
    engine.dispose()
    for pid, want in acked.items():
        assert pid in preds, f"acknowledged prediction {pid} was lost"
        assert preds[pid].image_sha256 == want["sha"]
        if want["label"] is not None:
            assert (preds[pid].label, preds[pid].labelled_by) == want["label"]
    for pid, row in preds.items():
        assert row.image_sha256 in images, f"prediction {pid} has no image row"
        assert store.exists(row.image_sha256), f"prediction {pid} has no image file"
        assert outputs.get(pid) == 2, f"prediction {pid} has {outputs.get(pid)} model outputs"
    assert set(outputs) <= set(preds)
    return {"predictions": len(preds), "images": len(images), "label_events": events}


@pytest.mark.slow
def test_concurrent_clients_lose_nothing(db_url: str, run_dir: Path, tmp_path: Path) -> None:
    port, acked, stop = free_port(), {}, threading.Event()
    with server(db_url, run_dir, tmp_path / "var", port) as (key, _):
        for t in _load(f"http://127.0.0.1:{port}", key, 4.0, acked, stop):
            t.join()
    assert len(acked) > 50
    found = _check_consistent(db_url, ImageStore(tmp_path / "var" / "images"), acked)
    # No duplicates: exactly one row per acknowledged upload.
    assert found["predictions"] == len(acked)
    assert found["label_events"] == sum(1 for a in acked.values() if a["label"])
    print(f"{db_url.split(':')[0]}: {len(acked)} acknowledged uploads, {found}")


@pytest.mark.slow
def test_sigkill_mid_load_then_restart(db_url: str, run_dir: Path, tmp_path: Path) -> None:
    port, acked, stop = free_port(), {}, threading.Event()
    with server(db_url, run_dir, tmp_path / "var", port) as (key, proc):
        threads = _load(f"http://127.0.0.1:{port}", key, 10.0, acked, stop)
        time.sleep(2.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join()
    assert len(acked) > 10
    found = _check_consistent(db_url, ImageStore(tmp_path / "var" / "images"), acked)
    print(f"{db_url.split(':')[0]}: killed after 2 s; {len(acked)} acknowledged, {found}")
    port = free_port()
    with server(db_url, run_dir, tmp_path / "var", port) as (key, _):  # it serves again
        r = httpx.post(
            f"http://127.0.0.1:{port}/predict",
            headers={"X-API-Key": key},
            files=[("files", ("after.png", png_bytes(777), "image/png"))],
            timeout=30,
        )
        assert r.status_code == 200


def _peak_rss_mb(pid: int) -> tuple[float, float]:
    """(peak, current) resident memory of one process, in MB, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_malformed_corpus_keeps_memory_bounded(run_dir: Path, tmp_path: Path) -> None:
    """Five rounds of the malformed corpus, plus an image just under the pixel limit that
    compresses to almost nothing: the web process's peak memory stays bounded and does not climb
    round after round."""
    from PIL import Image

    url = f"sqlite:///{tmp_path / 'var' / 'maxmin.db'}"
    port = free_port()
    big = encoded(Image.new("L", (5000, 5000), 200), "PNG")  # 25 M pixels, about 25 KB
    corpus = [*malformed_corpus(), ("5000x5000 flat png", big, {200})]
    with server(url, run_dir, tmp_path / "var", port) as (key, proc):
        base = f"http://127.0.0.1:{port}/predict"
        httpx.post(base, headers={"X-API-Key": key}, files=[("files", ("w.png", png_bytes(1)))])
        start_peak, _ = _peak_rss_mb(proc.pid)
        current = []
        for _ in range(5):
            for name, data, allowed in corpus:
                r = httpx.post(
                    base, headers={"X-API-Key": key}, files=[("files", ("x", data))], timeout=30
                )
                assert r.status_code in allowed, (name, r.status_code, r.text)
            current.append(_peak_rss_mb(proc.pid)[1])
        peak, _ = _peak_rss_mb(proc.pid)
    print(
        f"peak RSS {start_peak:.0f} MB after warm-up, {peak:.0f} MB after 5 x {len(corpus)} "
        f"images; RSS after each round {[round(c) for c in current]} MB"
    )
    # One 25 M-pixel grey decode is 25 MB (75 MB as RGB); two decode threads at once: 150 MB.
    assert peak - start_peak < 400
    assert current[-1] - current[1] < 60  # no climb once warm: nothing accumulates


def test_metrics_and_logs_cover_every_worker(run_dir: Path, tmp_path: Path) -> None:
    """With two workers, each scrape of /metrics (served by either worker) counts every
    prediction, whichever worker made it; and every request has its JSON access-log line on
    stderr, with its request id, whichever worker served it."""
    url = f"sqlite:///{tmp_path / 'var' / 'maxmin.db'}"
    port = free_port()
    log = tmp_path / "serve.log"
    with server(url, run_dir, tmp_path / "var", port, workers=2, log=log) as (key, _):
        base = f"http://127.0.0.1:{port}"
        ids = [f"line-{i}" for i in range(12)]
        for i, rid in enumerate(ids):  # a new connection each time: spread over the workers
            r = httpx.post(
                f"{base}/predict",
                headers={"X-API-Key": key, "X-Request-ID": rid},
                files=[("files", (f"{i}.png", png_bytes(i)))],
                timeout=30,
            )
            assert r.status_code == 200, r.text
        for _ in range(4):
            text = httpx.get(f"{base}/metrics", headers={"X-API-Key": key}, timeout=10).text
            counts = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("maxmin_predictions_total{") and 'model="baseline"' in line
            ]
            assert sum(counts) == 12, text
        deadline = time.monotonic() + 10  # each worker's logging thread writes the lines
        while True:
            lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
            access = {e["request_id"]: e for e in lines if e["logger"] == "maxmin_inspect.access"}
            if set(ids) <= set(access) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert set(ids) <= set(access), sorted(access)
        for rid in ids:
            entry = access[rid]
            assert (entry["route"], entry["status"], entry["level"]) == ("/predict", 200, "INFO")
            assert entry["ms"] > 0 and entry["process"] > 0


@pytest.mark.parametrize("setting", ["true", "false", "auto"])
def test_workers_share_one_model_process(
    run_dir: Path, tmp_path: Path, setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With two workers and MAXMIN_SHARED_MODELS=true, `serve` starts one model process for both
    (models loaded once, batches merged); with false, and with auto on the CPU, each worker has
    its own. Every way answers alike."""
    url = f"sqlite:///{tmp_path / 'var' / 'maxmin.db'}"
    port = free_port()
    monkeypatch.setenv("MAXMIN_SHARED_MODELS", setting)
    shared = setting == "true"  # the server runs on the CPU
    with server(url, run_dir, tmp_path / "var", port, workers=2) as (key, proc):
        spawned = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())
        ]
        direct = [p for p in spawned if p.ppid() == proc.pid]
        nested = [p for p in spawned if p.ppid() != proc.pid]
        # shared: the serve process starts 2 workers and 1 model host; otherwise each of
        # its 2 workers starts a model process of its own.
        assert (len(direct), len(nested)) == ((3, 0) if shared else (2, 2))
        answers: dict[int, list[dict]] = {0: [], 1: []}
        for i in range(6):
            r = httpx.post(
                f"http://127.0.0.1:{port}/predict",
                headers={"X-API-Key": key},
                files=[("files", (f"{i}.png", png_bytes(i % 2)))],
                timeout=30,
            )
            assert r.status_code == 200, r.text
            answers[i % 2].append(r.json()["data"][0]["results"])
        for seen in answers.values():  # whichever worker took it, the same answer each time
            assert set(seen[0]) == {"baseline", "maxmin"}
            for other in seen[1:]:
                for name, answer in seen[0].items():
                    assert other[name]["label"] == answer["label"]
                    assert other[name]["confidence"] == pytest.approx(answer["confidence"])


def test_worker_count_auto_is_one_per_usable_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve --workers auto`` (the default): one web process per core the service may use, at
    most MAX_AUTO_WORKERS; a number is taken as given; anything else is refused, naming auto."""
    import argparse

    from app.cli import MAX_AUTO_WORKERS, worker_count

    for cores, expected in ((1, 1), (2, 2), (3, 3), (64, MAX_AUTO_WORKERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert worker_count("auto") == expected
        assert worker_count(" AUTO ") == expected
    assert worker_count("3") == 3
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="auto"):
            worker_count(bad)


def test_serve_starts_a_worker_per_core_by_default(run_dir: Path, tmp_path: Path) -> None:
    """Started without --workers, the service runs one web process per usable core, each with
    its own model process on the CPU, and answers."""
    from app.cli import MAX_AUTO_WORKERS

    cores = min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS)
    url = f"sqlite:///{tmp_path / 'var' / 'maxmin.db'}"
    port = free_port()
    with server(url, run_dir, tmp_path / "var", port, workers=None) as (key, proc):
        spawned = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())
        ]
        direct = [p for p in spawned if p.ppid() == proc.pid]
        nested = [p for p in spawned if p.ppid() != proc.pid]
        # One worker: serve itself is the web process, its model process a direct child.
        assert (len(direct), len(nested)) == ((cores, cores) if cores > 1 else (1, 0))
        for i in range(4):
            r = httpx.post(  # a new connection each time: spread over the workers
                f"http://127.0.0.1:{port}/predict",
                headers={"X-API-Key": key},
                files=[("files", (f"{i}.png", png_bytes(i % 2)))],
                timeout=30,
            )
            assert r.status_code == 200, r.text
            assert set(r.json()["data"][0]["results"]) == {"baseline", "maxmin"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balancing: Linux")
def test_workers_share_persistent_connections(run_dir: Path, tmp_path: Path) -> None:
    """Connections opened at once, as a line system's or a load generator's, spread over the
    workers: each worker listens on a socket of its own, and the kernel balances them (with one
    shared socket, one worker often took every connection while the other idled)."""
    import socket

    url = f"sqlite:///{tmp_path / 'var' / 'maxmin.db'}"
    port = free_port()
    with server(url, run_dir, tmp_path / "var", port, workers=2) as (_, proc):
        workers = [
            p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())
        ]
        assert len(workers) == 2
        deadline = time.monotonic() + 60  # ready is one worker ready; each listens once ready
        while True:
            listening = {
                w.pid: [c for c in w.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
                for w in workers
            }
            if all(listening.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert all(len(socks) == 1 for socks in listening.values()), listening
        # Sockets of their own, not one inherited from the parent: two different sockets.
        inodes = {os.readlink(f"/proc/{pid}/fd/{s[0].fd}") for pid, s in listening.items()}
        assert len(inodes) == 2, inodes
        conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(32)]
        try:
            for c in conns:  # answered: accepted by a worker, and kept open
                c.sendall(b"GET /healthz HTTP/1.1\r\nHost: line\r\n\r\n")
            for c in conns:
                assert c.recv(4096).startswith(b"HTTP/1.1 200")
            held = {
                w.pid: sum(
                    1
                    for c in w.net_connections("tcp")
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                )
                for w in workers
            }
        finally:
            for c in conns:
                c.close()
        assert sum(held.values()) == 32, held
        # An even share on average; fewer than 4 of 32 happens by chance about once in 10^6.
        assert min(held.values()) >= 4, held


def test_readiness_follows_the_shared_model_process(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed, the shared model process makes /readyz answer 503 with the reason until the serve
    command's new one answers; then /readyz and /predict work again."""
    url = f"sqlite:///{tmp_path / 'var' / 'maxmin.db'}"
    port = free_port()
    monkeypatch.setenv("MAXMIN_SHARED_MODELS", "true")
    with server(url, run_dir, tmp_path / "var", port, workers=2) as (key, proc):
        base = f"http://127.0.0.1:{port}"
        spawned = [
            p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())
        ]
        assert len(spawned) == 3
        # The serve command starts the model process, and waits for it, before the workers.
        min(spawned, key=lambda p: p.create_time()).kill()
        deadline = time.monotonic() + 60
        seen = []
        while True:
            r = httpx.get(f"{base}/readyz", headers={"X-API-Key": key}, timeout=10)
            seen.append(r.status_code)
            if r.status_code == 503:
                assert "model process" in r.json()["detail"]
            if 503 in seen and r.status_code == 200:
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        # The other worker may have been loading from the old process when it died: it loads
        # again within moments, and meanwhile says why, with Retry-After, as a client expects.
        deadline = time.monotonic() + 10
        while True:
            r = httpx.post(
                f"{base}/predict",
                headers={"X-API-Key": key},
                files=[("files", ("a.png", png_bytes(3)))],
                timeout=30,
            )
            if r.status_code == 200:
                break
            assert r.status_code == 503 and "model process" in r.json()["detail"], r.text
            assert r.headers["Retry-After"] and time.monotonic() < deadline, r.text
            time.sleep(0.2)
        # Counted by the serve command, summed into /metrics with the workers' counts.
        text = httpx.get(f"{base}/metrics", headers={"X-API-Key": key}, timeout=10).text
        assert 'maxmin_model_process_restarts_total{process="shared"} 1.0' in text, text
