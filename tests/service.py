"""Helpers for the service tests: a trained run, databases (SQLite and PostgreSQL), images."""

from __future__ import annotations

import io
import os
import struct
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import write_folder
from training.engine import TrainConfig
from training.poc import PocConfig, run_poc

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
