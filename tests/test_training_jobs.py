"""Training from the service: a real trainer process per job, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.config import Settings
from app.core.db import upgrade
from app.crud.runs import register_run
from app.main import create_app
from app.tables import Run, TrainingJob
from tests.helpers import CLASSES, make_key, png_bytes, write_folder

SMALL = {"models": ["baseline", "maxmin"], "epochs": 2, "seeds": 1, "size": 24}


def epochs_in_all(models: int, seeds: int, epochs: int) -> int:
    """Epochs a run trains: each model's seeds, and its share of the recipe search."""
    from training.poc import SEARCH_GRID

    # The first seed once more without augmentation, the short trials of the grid's other
    # entries, and the best of them carried on to the end.
    rung = max(1, min(epochs, max(3, epochs // 3)))
    search = (len(SEARCH_GRID) - 1) * rung + (epochs - rung)
    return models * ((seeds + 1) * epochs + search)


@pytest.fixture
def datasets(tmp_path: Path) -> Path:
    root = tmp_path / "datasets"
    write_folder(root / "parts", {c: 10 for c in CLASSES}, easy=True)
    write_folder(root / "one class", {"good": 6})
    for cls in ("a", "b"):  # names that look like images, bytes that are not
        (root / "junk" / cls).mkdir(parents=True)
        for i in range(4):
            (root / "junk" / cls / f"{i}.png").write_bytes(b"not an image %d" % i)
    return root


@pytest.fixture
def client(db_url: str, datasets: Path, tmp_path: Path) -> Iterator[TestClient]:
    upgrade(db_url)
    settings = Settings(
        data_dir=tmp_path / "var",
        database_url=db_url,
        runs_dir=tmp_path / "runs",
        datasets_dir=datasets,
        device="cpu",
    )
    with TestClient(create_app(settings), headers={"X-API-Key": make_key(db_url)}) as c:
        yield c


def wait_until_ended(client: TestClient, job_id: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/training/jobs/{job_id}").json()
        if job["state"] != "running":
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def rows(client: TestClient, table: type) -> int:
    with client.app.state.sessions() as session:
        return session.execute(select(func.count()).select_from(table)).scalar_one()


def test_a_job_trains_and_registers_its_report(client: TestClient) -> None:
    listed = client.get("/training/datasets").json()
    by_name = {d["name"]: d for d in listed["data"]}
    assert by_name["parts"]["classes"] == CLASSES and by_name["parts"]["images"] == 30
    r = client.post("/training/jobs", json={"dataset": "parts", **SMALL})
    assert r.status_code == 202, r.text
    job = r.json()
    # The service runs PyTorch here, so the job writes no ONNX forms.
    assert job["state"] == "running" and job["options"] == SMALL | {
        "compress": False,
        "prune": None,
    }
    again = client.post("/training/jobs", json={"dataset": "parts", **SMALL})
    assert again.status_code == 409
    assert f"job {job['id']} is still running" in again.json()["detail"]
    seen_stages = set()
    deadline = time.monotonic() + 240
    while (cur := client.get(f"/training/jobs/{job['id']}").json())["state"] == "running":
        if cur["progress"]:
            seen_stages.add(cur["progress"]["stage"])
        assert time.monotonic() < deadline, cur
        time.sleep(0.1)
    assert cur["state"] == "done", cur
    assert seen_stages, "progress was never reported while running"
    report = client.get(cur["report_url"]).json()
    assert set(report["report"]["models"]) == {"baseline", "maxmin"}
    assert report["verdict"] == cur["message"]
    assert Path(report["run_dir"]) == Path(cur["run_dir"])
    status = json.loads((Path(cur["run_dir"]) / "status.json").read_text())
    assert status["state"] == "done" and status["epochs_done"] == status["epochs_total"]
    assert status["epochs_total"] == epochs_in_all(2, 1, 2)
    assert client.get("/reports").json()["count"] == 1
    listed = client.get("/training/jobs").json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    # The slot is free again.
    nxt = client.post("/training/jobs", json={"dataset": "parts", **SMALL, "epochs": 1})
    assert nxt.status_code == 202, nxt.text
    assert wait_until_ended(client, nxt.json()["id"])["state"] == "done"
    assert client.get("/reports").json()["count"] == 2


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"dataset": "../parts"}, "is not a folder name"),
        ({"dataset": "parts/../parts"}, "is not a folder name"),
        ({"dataset": "nope"}, "no dataset folder named 'nope'"),
        ({"dataset": "one class"}, "at least two class folders"),
        ({"dataset": "parts", "models": ["resnet"]}, "unknown model(s) resnet"),
        ({"dataset": "parts", "epochs": 0}, "greater than or equal to 1"),
        ({"dataset": "parts", "size": 4096}, "less than or equal to 512"),
        ({"dataset": "parts", "shell": "rm -rf /"}, "Extra inputs are not permitted"),
    ],
)
def test_a_bad_request_is_refused_naming_the_problem(
    client: TestClient, body: dict, detail: str
) -> None:
    r = client.post("/training/jobs", json=body)
    assert r.status_code == 422, r.text
    assert detail in json.dumps(r.json()["detail"])
    assert rows(client, TrainingJob) == 0


def test_only_admins_train(client: TestClient, db_url: str) -> None:
    for role in ("line", "inspector", "manager"):
        key = make_key(db_url, role)
        r = client.post("/training/jobs", json={"dataset": "parts"}, headers={"X-API-Key": key})
        assert r.status_code == 403, r.text
        assert client.get("/training/jobs", headers={"X-API-Key": key}).status_code == 403
    assert rows(client, TrainingJob) == 0
    page = client.get("/training", headers={"X-API-Key": make_key(db_url, "manager")})
    assert page.status_code == 403 and "needs an <strong>admin</strong> key" in page.text
    page = client.get("/training")  # the client's own key is an admin's
    assert page.status_code == 200
    assert 'value="parts" id="ds-' in page.text and "/static/training.js" in page.text
    one_class = page.text.split('value="one class"')[1].split("</tr>")[0]
    assert "disabled" in one_class and "needs at least two class folders" in one_class


def test_a_failing_run_ends_with_the_trainers_message(client: TestClient) -> None:
    r = client.post("/training/jobs", json={"dataset": "junk", **SMALL})
    assert r.status_code == 202, r.text  # the names look fine; only decoding finds out
    job = wait_until_ended(client, r.json()["id"])
    assert job["state"] == "failed" and job["report_url"] is None
    assert "usable" in job["message"] or "image" in job["message"], job["message"]
    assert rows(client, Run) == 0


def test_cancel_stops_the_trainer_and_frees_the_slot(client: TestClient) -> None:
    r = client.post("/training/jobs", json={"dataset": "parts", **SMALL, "epochs": 500})
    job = r.json()
    with client.app.state.sessions() as session:
        pid = session.get(TrainingJob, job["id"]).pid
    assert psutil.pid_exists(pid)
    deadline = time.monotonic() + 60
    while not (client.get(f"/training/jobs/{job['id']}").json()["progress"] or {}).get(
        "eta_seconds"
    ):  # epochs counted, and the time left estimated from them
        assert time.monotonic() < deadline
        time.sleep(0.2)
    progress = client.get(f"/training/jobs/{job['id']}").json()["progress"]
    assert progress["stage"] == "training" and progress["epochs_total"] == epochs_in_all(2, 1, 500)
    # The run opens with the first seed under the fixed recipe, before any other recipe.
    assert 1 <= progress["epochs_done"] < 500 and "baseline seed 0" in progress["detail"]
    r = client.post(f"/training/jobs/{job['id']}/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled" and r.json()["message"] == "cancelled by test-admin"
    gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert gone
    time.sleep(0.5)  # the worker's reaper has seen the exit: the state stays cancelled
    assert client.get(f"/training/jobs/{job['id']}").json()["state"] == "cancelled"
    assert client.post(f"/training/jobs/{job['id']}/cancel").status_code == 409
    assert client.post("/training/jobs/999/cancel").status_code == 404
    assert rows(client, Run) == 0
    r = client.post("/training/jobs", json={"dataset": "parts", **SMALL, "epochs": 1})
    assert r.status_code == 202, r.text
    assert wait_until_ended(client, r.json()["id"])["state"] == "done"


def _label_new_parts(client: TestClient, seeds: range) -> None:
    """A line posts parts and inspectors label them (the class from the seed)."""
    for i in seeds:
        r = client.post("/predict", files=[("files", (f"{i}.png", png_bytes(i), "image/png"))])
        assert r.status_code == 200, r.text
        pid = r.json()["data"][0]["id"]
        label = CLASSES[i % len(CLASSES)]
        assert client.put(f"/predictions/{pid}/label", json={"label": label}).status_code == 200


def _manifest(job: dict) -> list[dict]:
    data = Path(job["run_dir"] + ".data") / "labels.csv"
    with data.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_a_job_trains_on_inspected_parts_and_tests_on_parts_never_trained_on(
    trained_run: Path,
    datasets: Path,
    tmp_path: Path,
    service_client,  # noqa: ANN001
) -> None:
    options = {"runs_dir": tmp_path / "runs", "datasets_dir": datasets, "reload_seconds": 0.2}
    with service_client(None, **options) as client:
        with client.app.state.sessions() as session:
            register_run(session, trained_run)  # the champion, trained on other images
        deadline = time.monotonic() + 60
        while client.app.state.models.classifier is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = client.post("/training/jobs", json={"inspected": "alone", **SMALL})
        assert r.status_code == 422 and "too few" in r.json()["detail"]  # nothing labelled yet
        _label_new_parts(client, range(18))
        page = client.get("/training")
        assert "the inspected parts (18 labelled)" in page.text

        r = client.post("/training/jobs", json={"inspected": "alone", **SMALL})
        assert r.status_code == 202, r.text
        first = r.json()
        assert first["dataset"] == "inspected parts"
        rows = _manifest(first)
        assert len(rows) == 18 and {r["split"] for r in rows} == {"train", "test"}
        assert sum(r["split"] == "test" for r in rows) == 6  # 2 of each class's 6
        assert wait_until_ended(client, first["id"])["state"] == "done"
        with client.app.state.sessions() as session:
            new = session.execute(select(Run).where(Run.run_dir == first["run_dir"])).scalar_one()
            assert new.challenger_since is not None  # registered beside the champion
        with (Path(first["run_dir"]) / "split.csv").open(newline="", encoding="utf-8") as fh:
            split = list(csv.DictReader(fh))
        tested = {Path(r["path"]).stem for r in split if r["split"] == "test"}
        assert tested == {r["sha256"] for r in rows if r["split"] == "test"}
        trained = {Path(r["path"]).stem for r in split if r["split"] in ("train", "val")}

        # The run trained on inspected parts serves; more parts are labelled; the next job's
        # test split must leave out every part that run trained on.
        assert client.post(f"/runs/{new.id}/promote").status_code == 202
        _label_new_parts(client, range(100, 109))
        r = client.post("/training/jobs", json={"inspected": "merged", "dataset": "parts", **SMALL})
        assert r.status_code == 202, r.text
        second = r.json()
        assert second["dataset"] == "parts + inspected parts"
        rows = _manifest(second)
        inspected = [r for r in rows if r["sha256"]]
        folder = [r for r in rows if not r["sha256"]]
        assert len(inspected) == 27 and len(folder) == 30
        assert all(r["split"] == "train" and Path(r["path"]).is_file() for r in folder)
        test = {r["sha256"] for r in inspected if r["split"] == "test"}
        assert test and not test & trained
        assert {r["sha256"] for r in inspected if r["sha256"] in trained} <= {
            r["sha256"] for r in inspected if r["split"] == "train"
        }
        assert client.post(f"/training/jobs/{second['id']}/cancel").status_code == 200
        assert wait_until_ended(client, second["id"])["state"] == "cancelled"


def test_a_service_serving_pruned_forms_trains_runs_it_can_serve(
    trained_run: Path,
    datasets: Path,
    tmp_path: Path,
    service_client,  # noqa: ANN001
) -> None:
    """With MAXMIN_MODEL_FORM=pruned-int8, a job prunes its run as the served run was pruned, so
    the new run has the forms (and their operating points) the service needs."""
    import shutil

    from app.core.inference import Classifier
    from training.compress import compress_run

    served = tmp_path / "served"
    shutil.copytree(trained_run, served)
    compress_run(served, rounds=1, prune=0.75, prune_epochs=1)
    options = {
        "runs_dir": tmp_path / "runs",
        "datasets_dir": datasets,
        "runtime": "onnxruntime",
        "model_form": "pruned-int8",
    }
    with service_client(served, **options) as client:
        r = client.post("/training/jobs", json={"dataset": "parts", **SMALL})
        assert r.status_code == 202, r.text
        assert r.json()["options"]["prune"] == 0.75
        job = wait_until_ended(client, r.json()["id"], timeout=400)
    assert job["state"] == "done", job
    run = Path(job["run_dir"])
    study = json.loads((run / "report.json").read_text())["compression"]
    assert study["pruning"]["keep"] == 0.75
    new = Classifier(run, ["baseline", "maxmin"], "cpu", runtime="onnxruntime", form="pruned-int8")
    assert all(t is not None for t in new.thresholds.values())
