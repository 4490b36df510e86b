"""Serving another run without a restart: the run an admin chooses to serve (or, before any
choice, the first one registered) replaces the served models while requests go on; every answer
comes from one run's models; a run registered later does not take over by itself."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.db import upgrade
from app.core.inference import Classifier
from app.core.model_host import ModelHost, ModelHostClient
from app.core.model_process import ModelProcessFailed, ModelsToLoad
from app.crud.runs import choose_to_serve, register_run
from app.main import create_app
from tests.helpers import make_key, png_bytes, server, train_small_run

B_CLASSES = ["crack", "ok"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two runs that differ in everything preprocessing and naming depend on: A (3 classes, 24 px)
    and B (2 classes, 16 px)."""
    root = tmp_path_factory.mktemp("switch")
    a = train_small_run(root / "a")
    b = train_small_run(root / "b", B_CLASSES, per_class=10, size=16, epochs=2)
    return {"a": a.resolve(), "b": b.resolve()}


def _client(db_url: str, tmp_path: Path) -> TestClient:
    upgrade(db_url)
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=db_url,
        runs_dir=tmp_path / "no-runs",
        device="cpu",
        reload_seconds=0.2,
    )
    return TestClient(create_app(settings), headers={"X-API-Key": make_key(db_url)})


def _register(client: TestClient, run_dir: Path) -> int:
    with client.app.state.sessions() as session:
        return register_run(session, run_dir).id


def _wait_for_run(client: TestClient, run_dir: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/readyz")
        if r.status_code == 200 and r.json()["run"] == str(run_dir):
            return r.json()
        assert time.monotonic() < deadline, r.json()
        time.sleep(0.1)


def _wait_for_answers(answers: list, timeout_s: float = 60) -> None:
    """Until the line has had two answers more: the second was asked after the switch, so it
    comes from the run now served, however slow a loaded machine makes each request."""
    want, deadline = len(answers) + 2, time.monotonic() + timeout_s
    while len(answers) < want:
        assert time.monotonic() < deadline, "the line got no answers after the switch"
        time.sleep(0.05)


def test_a_chosen_run_replaces_the_served_one_while_requests_go_on(
    db_url: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    versions = {
        name: {n: m.version for n, m in Classifier(path, ["baseline", "maxmin"]).models.items()}
        for name, path in runs.items()
    }
    classes = {"a": ["dent", "good", "scratch"], "b": B_CLASSES}
    with _client(db_url, tmp_path) as client:
        ready = client.get("/readyz")  # nothing registered yet: not ready, and says why
        assert ready.status_code == 503 and "no trained models" in ready.json()["detail"]
        a_id = _register(client, runs["a"])
        _wait_for_run(client, runs["a"])  # served without a restart
        answers, stop = [], threading.Event()

        def line() -> None:  # a line system posting parts throughout
            i = 0
            while not stop.is_set():
                r = client.post("/predict", files=[("files", (f"{i}.png", png_bytes(i)))])
                answers.append((r.status_code, r.json()))
                i += 1

        worker = threading.Thread(target=line)
        worker.start()
        try:
            time.sleep(0.5)
            b_id = _register(client, runs["b"])  # registered, not chosen: A stays
            time.sleep(1.5)
            assert client.get("/readyz").json()["run"] == str(runs["a"])
            assert client.post(f"/reports/{b_id}/serve").status_code == 202  # chosen: served
            _wait_for_run(client, runs["b"])
            _wait_for_answers(answers)
            served = {r["id"]: r["serving"] for r in client.get("/reports").json()["data"]}
            assert served == {a_id: False, b_id: True}
            r = client.post(f"/reports/{a_id}/serve")  # an admin goes back to A
            assert r.status_code == 202, r.text
            _wait_for_run(client, runs["a"])
            _wait_for_answers(answers)
        finally:
            stop.set()
            worker.join()
        assert answers and all(code == 200 for code, _ in answers), [
            a for a in answers if a[0] != 200
        ][:3]
        seen = []
        for _, body in answers:
            item = body["data"][0]
            run = next(
                k
                for k, v in versions.items()
                if v["maxmin"] == item["results"]["maxmin"]["model_version"]
            )
            # Both models of one answer, and its labels, come from one run.
            assert item["results"]["baseline"]["model_version"] == versions[run]["baseline"]
            assert set(item["results"]["maxmin"]["probabilities"]) == set(classes[run])
            assert item["results"]["baseline"]["label"] in classes[run]
            if not seen or seen[-1] != run:
                seen.append(run)
        assert seen == ["a", "b", "a"], seen
        # The live A/B counts the served run's answers only.
        stats = client.get("/stats").json()
        assert stats["versions"] == versions["a"] and stats["classes"] == classes["a"]


def test_a_run_that_cannot_load_leaves_the_served_one_in_place(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken-run"
    shutil.copytree(runs["a"], broken)
    for weights in (broken / "checkpoints").glob("maxmin-*.safetensors"):
        weights.write_bytes(b"not weights")
    db_url = f"sqlite:///{tmp_path / 'db' / 'maxmin.db'}"
    with _client(db_url, tmp_path) as client:
        a_id = _register(client, runs["a"])
        _wait_for_run(client, runs["a"])
        broken_id = _register(client, broken)
        assert client.post(f"/reports/{broken_id}/serve").status_code == 202  # tried; A stays
        deadline = time.monotonic() + 30
        while not (client.get("/readyz").json().get("detail") or "").startswith("cannot load"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ready = client.get("/readyz").json()
        assert ready["status"] == "ok" and ready["run"] == str(runs["a"])
        assert f"still serving {runs['a']}" in ready["detail"] and str(broken) in ready["detail"]
        assert (
            client.post("/predict", files=[("files", ("x.png", png_bytes(1)))]).status_code == 200
        )
        assert client.post(f"/reports/{a_id}/serve").status_code == 202  # choose A explicitly
        deadline = time.monotonic() + 30
        while client.get("/readyz").json().get("detail"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert client.post("/reports/999/serve").status_code == 404
        inspector = make_key(db_url, "manager")
        r = client.post(f"/reports/{a_id}/serve", headers={"X-API-Key": inspector})
        assert r.status_code == 403


def test_a_pinned_run_is_not_switched(runs: dict[str, Path], tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'db' / 'maxmin.db'}"
    upgrade(db_url)
    settings = Settings(
        data_dir=tmp_path / "var", database_url=db_url, run_dir=runs["a"], device="cpu"
    )
    with TestClient(create_app(settings), headers={"X-API-Key": make_key(db_url)}) as client:
        b_id = _register(client, runs["b"])
        r = client.post(f"/reports/{b_id}/serve")
        assert r.status_code == 409 and "MAXMIN_RUN_DIR" in r.json()["detail"]
        time.sleep(0.5)
        assert client.get("/readyz").json()["run"] == str(runs["a"])


def test_the_shared_model_process_serves_two_runs(runs: dict[str, Path]) -> None:
    host = ModelHost(ModelsToLoad(runs["a"], ("baseline", "maxmin"), "cpu"))
    try:
        client = ModelHostClient(host.address, host.authkey)
        local = {k: Classifier(v, ["baseline", "maxmin"], "cpu") for k, v in runs.items()}
        images = {
            k: np.stack([c.decode(png_bytes(i), 10**7).array for i in range(3)])
            for k, c in local.items()
        }
        client.load(runs["b"])
        assert set(client.info()["runs"]) == {str(runs["a"]), str(runs["b"])}
        for k in ("a", "b"):
            got = client.classify(images[k], runs[k])
            np.testing.assert_allclose(
                got["maxmin"][0], local[k].classify(images[k])["maxmin"][0], atol=1e-6
            )
        with pytest.raises(ModelProcessFailed, match="cannot load"):
            client.load(runs["a"].parent / "nowhere")
        assert client.classify(images["a"])["baseline"][0].shape == (3, 3)  # still serving
        client.close()
    finally:
        host.close()


def test_every_worker_switches_with_a_shared_model_process(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """Two workers and one model process: a run chosen to serve reaches both workers."""
    db_url = f"sqlite:///{tmp_path / 'var' / 'maxmin.db'}"
    upgrade(db_url)
    from app.core.db import command_session

    with command_session(db_url) as session:
        register_run(session, runs["a"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MAXMIN_SHARED_MODELS": "true", "MAXMIN_RELOAD_SECONDS": "0.3"}
    with server(db_url, None, tmp_path / "var", port, workers=2, env=env) as (key, _):
        base = f"http://127.0.0.1:{port}"
        ready = httpx.get(f"{base}/readyz", headers={"X-API-Key": key}, timeout=10).json()
        assert ready["run"] == str(runs["a"])
        with command_session(db_url) as session:
            choose_to_serve(session, register_run(session, runs["b"]))
        deadline, in_a_row = time.monotonic() + 60, 0
        while in_a_row < 12:  # each request reaches one worker or the other
            r = httpx.post(
                f"{base}/predict",
                headers={"X-API-Key": key},
                files=[("files", ("p.png", png_bytes(5)))],
                timeout=30,
            )
            assert r.status_code == 200, r.text
            labels = set(r.json()["data"][0]["results"]["maxmin"]["probabilities"])
            in_a_row = in_a_row + 1 if labels == set(B_CLASSES) else 0
            assert time.monotonic() < deadline, "not every worker switched"
            time.sleep(0.05)
