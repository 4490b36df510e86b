"""The pages in a real browser: upload on the inspector page, label, see it on the dashboard.

Runs the service in its own process (uvicorn on loopback) and drives Debian's Chromium through
Playwright. CI installs Chromium and sets MAXMIN_REQUIRE_BROWSER=1: there a missing browser fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.core.db import make_engine, session_factory, upgrade
from app.crud.runs import register_run
from tests.helpers import (
    CLASSES,
    free_port,
    make_key,
    png_bytes,
    wait_until_ready,
    write_folder,
)
from tests.helpers import (
    server as run_server,
)

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = (
        os.environ.get("MAXMIN_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if not path:
        if os.environ.get("MAXMIN_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium not found but MAXMIN_REQUIRE_BROWSER=1")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, trained_run: Path
) -> Iterator[tuple[str, str, str]]:
    root = tmp_path_factory.mktemp("browser")
    run_dir = trained_run
    url = f"sqlite:///{root / 'var' / 'maxmin.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_factory(engine)() as session:
        register_run(session, run_dir)
    engine.dispose()
    manager_key = make_key(url, "manager", "anna (line manager)")
    admin_key = make_key(url, "admin", "ole (engineer)")
    write_folder(root / "datasets" / "line 3 parts", {c: 10 for c in CLASSES}, easy=True)
    port = free_port()
    env = {
        **os.environ,
        "MAXMIN_DATASETS_DIR": str(root / "datasets"),
        "MAXMIN_RUNS_DIR": str(root / "runs"),
        "MAXMIN_DATA_DIR": str(root / "var"),
        "DATABASE_URL": url,
        "MAXMIN_RELOAD_SECONDS": "0.5",  # serves the registered run, and follows a change
        "MAXMIN_DEVICE": "cpu",
    }
    # The real start-up path: `maxmin-inspect serve` (migrates, then runs uvicorn).
    proc = subprocess.Popen(
        [sys.executable, "-m", "maxmin_inspect", "serve", "--port", str(port)],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, proc, 60)
        yield base, manager_key, admin_key
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_upload_label_and_see_it_on_the_dashboard(
    server: tuple[str, str, str], tmp_path: Path
) -> None:
    executable = _chromium()
    server, key, _ = server
    from playwright.sync_api import expect, sync_playwright

    image = tmp_path / "part-0042.png"
    image.write_bytes(png_bytes(42))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{server}/dashboard")  # not logged in: sent to the login form
            expect(page).to_have_url(f"{server}/login?next=/dashboard")
            page.fill("#key", "mmi_not-a-real-key")
            page.click("#login-button")
            expect(page.locator("#login-error")).to_be_visible()
            page.fill("#key", key)
            page.click("#login-button")
            expect(page).to_have_url(f"{server}/dashboard")
            expect(page.locator("#labelled-count")).to_have_text("0")
            page.goto(f"{server}/")
            page.set_input_files("#files", str(image))
            page.click("#send")
            card = page.locator(".card").first
            expect(card.locator(".answer")).to_have_count(2)  # both models answered
            expect(card.locator(".model-label").first).not_to_be_empty()
            card.locator("button[data-label='scratch']").click()
            expect(card.locator(".label-status")).to_have_text("Labelled scratch.")
            page.goto(f"{server}/dashboard")
            expect(page.locator("#labelled-count")).to_have_text("1")
            expect(page.locator("#live")).to_contain_text("maxmin")
            page.goto(f"{server}/")
            expect(page.locator("#recent")).to_contain_text("scratch")
        finally:
            browser.close()


def test_the_engineer_trains_from_the_page_and_opens_the_report(
    server: tuple[str, str, str],
) -> None:
    executable = _chromium()
    server, manager_key, admin_key = server
    from playwright.sync_api import expect, sync_playwright

    for i in range(9):  # parts from the line, labelled by inspectors: trained on with the folder
        r = httpx.post(
            f"{server}/predict",
            files=[("files", (f"{i}.png", png_bytes(200 + i), "image/png"))],
            headers={"X-API-Key": admin_key},
            timeout=30,
        )
        pid = r.json()["data"][0]["id"]
        r = httpx.put(
            f"{server}/predictions/{pid}/label",
            json={"label": CLASSES[i % 3]},
            headers={"X-API-Key": admin_key},
            timeout=30,
        )
        assert r.status_code == 200, r.text
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{server}/login?next=/training")
            page.fill("#key", manager_key)  # a manager may not train
            page.click("#login-button")
            expect(page.locator("body")).to_contain_text("this page needs an admin key")
            page.context.clear_cookies()
            page.goto(f"{server}/login?next=/training")
            page.fill("#key", admin_key)
            page.click("#login-button")
            expect(page).to_have_url(f"{server}/training")
            expect(page.locator("#datasets")).to_contain_text("line 3 parts")
            expect(page.locator("#train-on")).to_contain_text("inspected parts")
            page.check("input[name=inspected][value=merged]")
            page.uncheck("input[name=models][value=maxmin_half]")
            page.fill("input[name=epochs]", "2")
            page.fill("input[name=seeds]", "1")
            page.fill("input[name=size]", "24")
            page.click("#start")
            expect(page.locator("#status")).to_contain_text(
                "started on line 3 parts + inspected parts"
            )
            job = page.locator("tr.job").first
            expect(job.locator(".state")).to_have_text("done", timeout=180_000)
            # Registered, not yet served: the engineer chooses to serve it, without a restart.
            job.locator("button.serve").click()
            expect(page.locator("#status")).to_contain_text(
                "Serving the models of report", timeout=30_000
            )  # loading both models takes a while on a busy machine
            job.locator("a", has_text="report").click()
            expect(page.locator("body")).to_contain_text("maxmin")
            page.goto(f"{server}/dashboard")
            rows = page.locator("#reports tr[id^=report-]")
            expect(rows).to_have_count(2)
            expect(rows.first.locator(".serving")).to_be_visible()  # the new run, newest first
            rows.nth(1).locator("button.serve").click()  # and back to the first one
            expect(rows.nth(1).locator(".serving")).to_be_visible(timeout=30_000)
            expect(rows.first.locator("button.serve")).to_be_visible()
            # The new run as the challenger, in shadow; then promoted, and rolled back.
            rows.first.locator("button.challenge").click()
            expect(rows.first.locator(".challenger")).to_be_visible(timeout=30_000)
            expect(page.locator("#promotion-verdict")).to_contain_text("not enough evidence")
            page.locator("#promote").click()  # the page reloads once the line is switched
            expect(rows.first.locator(".serving")).to_be_visible(timeout=30_000)
            page.locator("#rollback").click()
            expect(rows.nth(1).locator(".serving")).to_be_visible(timeout=30_000)
            page.goto(f"{server}/history")
            served = page.locator("#served tr")
            expect(served.nth(1)).to_contain_text("rollback")
            expect(served.nth(1)).to_contain_text("ole (engineer)")
            expect(served.nth(2)).to_contain_text("promote")
        finally:
            browser.close()


@pytest.fixture
def unsure_server(trained_run: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The service on a copy of the trained run whose MaxMin threshold no answer reaches: every
    part goes to review."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    report = json.loads((run / "report.json").read_text())
    report["models"]["maxmin"]["operating_point"]["threshold"] = 1.01
    (run / "report.json").write_text(json.dumps(report))
    port = free_port()
    url = f"sqlite:///{tmp_path / 'maxmin.db'}"
    with run_server(url, run, tmp_path / "var", port) as (key, _):
        yield f"http://127.0.0.1:{port}", key


def test_the_inspector_works_through_the_review_queue(unsure_server: tuple[str, str]) -> None:
    executable = _chromium()
    base, key = unsure_server
    from playwright.sync_api import expect, sync_playwright

    for seed in (7, 8):  # a line system's parts, both unsure
        r = httpx.post(
            f"{base}/predict",
            files=[("files", (f"{seed}.png", png_bytes(seed), "image/png"))],
            headers={"X-API-Key": key},
            timeout=30,
        )
        assert r.json()["data"][0]["decision"]["action"] == "review"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{base}/login")
            page.fill("#key", key)
            page.click("#login-button")
            expect(page).to_have_url(f"{base}/")
            expect(page.locator("#queue-count")).to_have_text("2")
            first = page.locator("#queue .card").first
            expect(first.locator(".decision")).to_contain_text("review")
            first.locator("button[data-label='dent']").click()
            expect(first.locator(".label-status")).to_have_text("Labelled dent.")
            expect(page.locator("#queue-count")).to_have_text("1")
            page.reload()  # labelled parts leave the queue for good
            expect(page.locator("#queue-count")).to_have_text("1")
            expect(page.locator("#queue .card")).to_have_count(1)
        finally:
            browser.close()
