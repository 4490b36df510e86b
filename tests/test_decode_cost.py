"""What the costliest uploads can do to the web process: its peak memory while it decodes them,
measured against the bound the limits promise (issue: a 78 KB PNG once cost a gigabyte)."""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.helpers import free_port, png_bytes, server

BOUND_MB = 512  # above the warm web process: one large image decoding at a time, plus slack


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _worst() -> dict[str, tuple[bytes, int]]:
    """Small on the wire, large decoded, each at the per-image pixel limit (40 M): the expected
    status of each."""
    side = 6300  # 39.7 M pixels
    return {
        "strip 1 x 39,999,999": (_png(Image.new("L", (1, 39_999_999), 7)), 422),
        "16-bit grey": (_png(Image.fromarray(np.zeros((side, side), dtype=np.uint16))), 200),
        "RGBA": (_png(Image.new("RGBA", (side, side), (9, 9, 9, 128))), 200),
        "RGB": (_png(Image.new("RGB", (side, side), (9, 9, 9))), 200),
        "1:31.9 RGB": (_png(Image.new("RGB", (35_700, 1_118), (9, 9, 9))), 200),
    }


def _peak_rss_reset(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
        fh.write("5")


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_the_costliest_uploads_stay_within_the_memory_bound(
    trained_run: Path, tmp_path: Path
) -> None:
    worst = _worst()
    port = free_port()
    url = f"sqlite:///{tmp_path / 'maxmin.db'}"
    with server(url, trained_run, tmp_path / "var", port) as (key, proc):
        base = f"http://127.0.0.1:{port}"
        headers = {"X-API-Key": key}
        files = [("files", ("warm.png", png_bytes(1), "image/png"))]
        assert httpx.post(f"{base}/predict", files=files, headers=headers).status_code == 200
        web = psutil.Process(proc.pid)  # the serve command is the web process (one worker)
        before = web.memory_info().rss / 2**20
        _peak_rss_reset(web.pid)

        def post(name: str) -> tuple[str, int, str]:
            data, _ = worst[name]
            r = httpx.post(
                f"{base}/predict",
                files=[("files", ("x.png", data, "image/png"))],
                headers=headers,
                timeout=120,
            )
            return name, r.status_code, r.text

        # Two of each at once: the decode budget must serialize them, not stack them.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, [n for n in worst for _ in range(2)]))
        grown = _peak_rss_mb(web.pid) - before
    for name, status, text in answers:
        assert status == worst[name][1], (name, status, text)
    assert "sides more than 32 times apart" in next(t for n, _, t in answers if "strip" in n)
    assert grown < BOUND_MB, f"the web process grew by {grown:.0f} MB decoding {list(worst)}"


def test_a_request_holding_too_many_pixels_in_all_is_refused(service_client, trained_run) -> None:  # noqa: ANN001
    big = _png(Image.new("L", (4000, 4000), 9))  # 16 M pixels each
    with service_client(trained_run, max_request_pixels=40_000_000) as client:
        files = [("files", (f"{i}.png", big, "image/png")) for i in range(3)]
        r = client.post("/predict", files=files)
        assert r.status_code == 413, r.text
        assert "more than 40000000 pixels in all" in r.json()["detail"]
        assert client.get("/predictions").json()["count"] == 0  # nothing stored
        r = client.post("/predict", files=files[:2])
        assert r.status_code == 200, r.text


def test_the_pixel_budget_makes_large_decodes_take_turns() -> None:
    import threading

    from app.core.limits import PixelBudget

    budget = PixelBudget(100)
    order: list[str] = []
    first_in, release = threading.Event(), threading.Event()

    def big() -> None:
        with budget.hold(10, 10):
            order.append("big in")
            first_in.set()
            release.wait(5)
            order.append("big out")

    def small() -> None:
        first_in.wait(5)
        with budget.hold(5, 5):
            order.append("small in")

    threads = [threading.Thread(target=big), threading.Thread(target=small)]
    for t in threads:
        t.start()
    first_in.wait(5)
    threading.Event().wait(0.2)  # the small one is waiting for room by now
    assert order == ["big in"]
    release.set()
    for t in threads:
        t.join(5)
    assert order == ["big in", "big out", "small in"]
    with budget.hold(10_000, 10_000):  # larger than the whole budget: decoded alone, not stuck
        assert budget.held == 100
    assert budget.held == 0
