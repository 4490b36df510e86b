"""Every helper the tests share: generated image folders, a trained run, databases (SQLite and
PostgreSQL), keys, images, and a running service. Test modules and conftest import from here,
never from each other."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from training.demo import make_image
from training.engine import TrainConfig
from training.poc import PocConfig, run_poc

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ENV = "MAXMIN_TEST_POSTGRES_URL"  # e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test
CLASSES = ["dent", "good", "scratch"]


def train_small_run(
    root: Path,
    classes: list[str] = CLASSES,
    per_class: int = 12,
    size: int = 24,
    epochs: int = 3,
) -> Path:
    """A real (tiny) training run with baseline and MaxMin, as the service loads it."""
    data = write_folder(root / "parts", {c: per_class for c in classes}, easy=True)
    cfg = PocConfig(
        data=str(data),
        out=str(root / "run"),
        models=["baseline", "maxmin"],
        size=size,
        seeds=1,
        device="cpu",
        train=TrainConfig(epochs=epochs, batch_size=8),
        latency_budget_s=0.1,
        progress=False,
    )
    return run_poc(cfg)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database on the server in POSTGRES_ENV; dropped after."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        if os.environ.get("MAXMIN_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{POSTGRES_ENV} is not set but MAXMIN_REQUIRE_POSTGRES=1")
        pytest.skip(f"PostgreSQL tests need {POSTGRES_ENV} (CI sets it)")
    url = make_url(base)
    name = f"maxmin_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def png_bytes(seed: int = 0, size: int = 32, brightness: int = 120) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.normal(brightness, 20, (size, size)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def image_as(fmt: str, size: int = 32) -> bytes:
    """A small image saved in ``fmt``, any format Pillow writes."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 150)).save(buf, format=fmt)
    return buf.getvalue()


def flat_png(size: int) -> bytes:
    """A large but tiny-on-disk PNG: one grey level."""
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int = 0, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims huge dimensions (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_key(db_url: str, role: str = "admin", name: str | None = None) -> str:
    """A real API key in the database at ``db_url`` (migrated already)."""
    from app.core.db import command_session
    from app.core.security import create_key

    with command_session(db_url, migrate=False) as session:
        key, _ = create_key(session, role, name or f"test-{role}")
    return key


def encoded(img, fmt: str, **kw) -> bytes:  # noqa: ANN001
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def malformed_corpus() -> list[tuple[str, bytes, set[int]]]:
    """Images that are broken, odd or hostile: (name, bytes, the statuses allowed)."""
    from PIL import Image, PngImagePlugin

    rgb = Image.new("RGB", (40, 30), (120, 60, 30))
    frames = [Image.new("P", (20, 20), i) for i in (1, 2)]
    anim = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("comment", "x" * 150_000)
    palette = Image.new("P", (20, 20), 3)
    palette.info["transparency"] = 3
    jpeg = encoded(rgb, "JPEG")
    return [
        ("animated gif", anim, {415}),  # a format outside the allow-list
        ("16-bit grey png", encoded(Image.new("I;16", (24, 24), 40000), "PNG"), {200}),
        ("cmyk jpeg", encoded(Image.new("CMYK", (24, 24), (0, 80, 80, 0)), "JPEG"), {200}),
        ("palette png with transparency", encoded(palette, "PNG"), {200}),
        ("huge text metadata", encoded(Image.new("L", (16, 16)), "PNG", pnginfo=meta), {200}),
        ("wrong magic bytes", b"\x00\x00\x00\x00" + jpeg[4:], {422}),
        ("zero-size png", bomb_png(0, 0), {422}),
        ("bomb png", bomb_png(60_000, 60_000), {413}),
        ("bomb tiff header", b"II*\x00" + b"\x08\x00\x00\x00" + b"\x00" * 64, {422}),
        ("jpeg cut in half", jpeg[: len(jpeg) // 2], {422}),
    ]


def write_folder(
    root: Path,
    per_class: dict[str, int],
    size: int = 32,
    seed: int = 0,
    fmt: str = "png",
    easy: bool = False,
) -> Path:
    """Write ``per_class[name]`` generated surface images into ``root/<name>/``.

    ``easy`` makes classes differ in brightness, learnable in a handful of steps.
    """
    rng = np.random.default_rng(seed)
    kinds = ["good", "scratch", "dent", "spots"]
    for k, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if easy:
                pixels = rng.normal(40 + 70 * k, 15, (size, size)).clip(0, 255).astype(np.uint8)
                img = Image.fromarray(pixels, mode="L")
            else:
                img = make_image(kinds[k % len(kinds)], rng, size)
            img.save(root / name / f"{name}_{i}.{fmt}")
    return root


def copy_subset(src: Path, dst: Path, step: int, limit: int | None = None) -> list[str]:
    """Every ``step``-th JPEG of each class folder of ``src`` (a spread over the class, not its
    first images; at most ``limit`` each) copied to ``dst``; returns the class names."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    for cls in classes:
        (dst / cls).mkdir(parents=True)
        for f in sorted((src / cls).glob("*.jpg"))[::step][:limit]:
            shutil.copy(f, dst / cls / f.name)
    return classes


def wait_until_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``base``/readyz until it answers 200; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the service at {base} did not become ready within {timeout_s:g} s")
        time.sleep(0.2)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(
    db_url: str,
    run_dir: Path | None,
    data_dir: Path,
    port: int,
    workers: int | None = 1,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A running `maxmin-inspect serve`; yields an admin key for it. With ``run_dir`` None it
    serves the registered runs (and follows a change of them). ``workers`` None: serve's own
    default. ``log``: a file for its stderr."""
    from app.core.db import upgrade

    upgrade(db_url)
    key = make_key(db_url)
    with _serve(db_url, run_dir, data_dir, port, workers, env, log) as proc:
        yield key, proc


@contextmanager
def _serve(
    db_url: str,
    run_dir: Path | None,
    data_dir: Path,
    port: int,
    workers: int | None = 1,
    extra_env: dict[str, str] | None = None,
    log: Path | None = None,
) -> Iterator[subprocess.Popen]:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "MAXMIN_DATA_DIR": str(data_dir),
        "MAXMIN_DEVICE": "cpu",
        **({"MAXMIN_RUN_DIR": str(run_dir)} if run_dir is not None else {}),
        **(extra_env or {}),
    }
    if run_dir is None:
        env.pop("MAXMIN_RUN_DIR", None)  # not even from the environment the tests run in
    stderr = log.open("wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "maxmin_inspect",
            "serve",
            "--port",
            str(port),
            *(["--workers", str(workers)] if workers is not None else []),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", proc, 60 * (workers or 4))
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)
        if log is not None:
            stderr.close()


def predict_across_a_kill(client, pid: int, detail: str) -> httpx.Response:  # noqa: ANN001
    """Kill the child process ``pid`` (SIGKILL), then predict once. The kill lands either before
    the request reaches the child (a fresh process answers, or 503 while it starts) or while the
    request is in flight (503 naming the cause, ``detail``); never a 500. Returns the answer."""
    upload = [("files", ("a.png", png_bytes(3), "image/png"))]
    os.kill(pid, signal.SIGKILL)
    r = client.post("/predict", files=upload)
    assert r.status_code in (200, 503), r.text
    if r.status_code == 503:
        assert detail in r.json()["detail"], r.text
        assert r.headers["Retry-After"]
    return r
