"""The operating point: each model's threshold chosen on the validation split, the decision per
part in /predict and in `maxmin-inspect predict`, and the review queue's query."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from app.crud.runs import register_run
from app.tables import Run
from inspectlib.decision import (
    ANSWERS_FILE,
    NEVER,
    answers_of,
    choose_from_answers,
    choose_operating_point,
    decide,
    rates_at,
)
from maxmin_inspect.main import main
from tests.helpers import png_bytes


def test_the_threshold_is_the_lowest_that_keeps_the_escape_rate() -> None:
    # Class 0 is good. Two defective parts (label 1) are predicted good: one at 0.6, one at 0.8.
    prob = np.array([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7], [0.95, 0.05], [0.2, 0.8]])
    y = np.array([0, 1, 1, 1, 0, 1])
    point = choose_operating_point(prob, y, target=0.0, good=0)
    assert point["kind"] == "escape_rate" and point["threshold"] == pytest.approx(0.9)
    assert point["validation"] == {"review_rate": pytest.approx(4 / 6), "rate": 0.0}
    loose = choose_operating_point(prob, y, target=0.25, good=0)  # one escape in four allowed
    assert loose["threshold"] == pytest.approx(0.7)
    assert rates_at(prob, y, 0.0, 0) == {"review_rate": 0.0, "rate": 0.5}
    curve = [c["review_rate"] for c in point["curve"]]
    assert curve == sorted(curve)  # a higher threshold never reviews fewer parts
    never = choose_operating_point(np.array([[0.9, 0.1]]), np.array([1]), 0.0, good=0)
    assert never["threshold"] == NEVER  # no threshold keeps it: every part to review
    errors = choose_operating_point(prob, y, target=0.0, good=None)
    assert errors["kind"] == "error_rate" and errors["threshold"] == pytest.approx(0.9)


def test_the_decision_rule() -> None:
    t = {"baseline": 0.8, "maxmin": 0.7}
    assert decide({"baseline": ("good", 0.9), "maxmin": ("good", 0.95)}, t, "good").action == (
        "accept"
    )
    d = decide({"baseline": ("dent", 0.9), "maxmin": ("dent", 0.75)}, t, "good")
    assert d.action == "reject" and "dent" in d.reason
    d = decide({"baseline": ("dent", 0.9), "maxmin": ("good", 0.99)}, t, "good")
    assert d.action == "review" and "disagree" in d.reason
    d = decide({"baseline": ("good", 0.79), "maxmin": ("good", 0.99)}, t, "good")
    assert d.action == "review" and "baseline 0.79 < 0.80" in d.reason
    no_point = {"baseline": None, "maxmin": None}
    assert decide({"baseline": ("dent", 0.1), "maxmin": ("dent", 0.2)}, no_point, None).action == (
        "accept"
    )


def test_every_run_reports_its_operating_point(trained_run: Path) -> None:
    report = json.loads((trained_run / "report.json").read_text())
    for m in report["models"].values():
        p = m["operating_point"]
        assert p["kind"] == "error_rate" and 0 <= p["threshold"] <= NEVER
        assert p["validation"]["rate"] <= p["target"] or p["threshold"] == NEVER
        assert {"review_rate", "rate"} <= set(p["test"]) and len(p["curve"]) == 41
    html = (trained_run / "report.html").read_text()
    assert 'id="operating"' in html and "Operating point" in html


def _run_with(trained_run: Path, tmp_path: Path, thresholds: dict, good: str | None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    report = json.loads((run / "report.json").read_text())
    for name, t in thresholds.items():
        report["models"][name]["operating_point"]["threshold"] = t
    report["metric"]["good_class"] = good
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_predict_answers_with_a_decision_and_the_queue_finds_it(
    trained_run: Path,
    tmp_path: Path,
    db_url: str,
    service_client,  # noqa: ANN001
) -> None:
    unsure = _run_with(trained_run, tmp_path, {"baseline": 0.0, "maxmin": NEVER}, "good")
    with service_client(unsure, db_url=db_url) as client:
        ids = []
        for seed in (1, 2, 3):
            r = client.post("/predict", files=[("files", ("p.png", png_bytes(seed), "image/png"))])
            assert r.status_code == 200, r.text
            made = r.json()["data"][0]
            assert made["decision"]["action"] == "review", made["decision"]
            assert "maxmin" in made["decision"]["reason"]
            ids.append(made["id"])
        queue = client.get(
            "/predictions", params={"decision": "review", "labelled": False, "oldest_first": True}
        ).json()
        assert queue["count"] == 3 and [p["id"] for p in queue["data"]] == ids  # oldest first
        assert client.put(f"/predictions/{ids[0]}/label", json={"label": "good"}).status_code == 200
        left = client.get("/predictions", params={"decision": "review", "labelled": False}).json()
        assert left["count"] == 2
        assert client.get("/predictions", params={"decision": "maybe"}).status_code == 422
        assert client.get(f"/predictions/{ids[1]}").json()["decision"]["action"] == "review"
        page = client.get("/")  # the inspector page opens on the queue, with its count
        assert '<span id="queue-count">2</span>' in page.text
        assert page.text.index('id="queue"') < page.text.index('id="upload"')
        assert f'"id": {ids[1]}' in page.text and f'"id": {ids[0]}' not in page.text
        assert client.put(f"/predictions/{ids[1]}/label", json={"label": "dent"}).status_code == 200
        d = client.get("/stats").json()["decisions"]
        assert d["counts"] == {"accept": 0, "reject": 0, "review": 3} and d["review_rate"] == 1.0
        # The labelled dent was sent to review, not accepted: no escape, out of one defective.
        assert d["escape_rate"]["value"] == 0.0 and d["escape_rate"]["labelled_defective"] == 1
        assert "3 sent to review (100.0%)" in client.get("/dashboard").text
        assert 'maxmin_decisions_total{action="review"} 3.0' in client.get("/metrics").text


def test_confident_parts_are_accepted_or_rejected(
    trained_run: Path,
    tmp_path: Path,
    service_client,  # noqa: ANN001
) -> None:
    sure = _run_with(trained_run, tmp_path, {"baseline": 0.0, "maxmin": 0.0}, "good")
    with service_client(sure) as client:
        for seed in range(6):
            made = client.post(
                "/predict", files=[("files", ("p.png", png_bytes(seed), "image/png"))]
            ).json()["data"][0]
            labels = {r["label"] for r in made["results"].values()}
            want = "review" if len(labels) > 1 else "accept" if labels == {"good"} else "reject"
            assert made["decision"]["action"] == want, made


def test_batch_prediction_from_the_command_line(trained_run: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = tmp_path / "stills" / "line3"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"part{i}.png").write_bytes(png_bytes(i))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image type: not even tried")
    out = tmp_path / "out.csv"
    assert main(["predict", str(trained_run), str(tmp_path / "stills"), "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["file"]).name for r in rows] == [f"part{i}.png" for i in range(5)]
    assert set(rows[0]) == {
        "file", "baseline_label", "baseline_confidence", "maxmin_label", "maxmin_confidence",
        "decision", "reason",
    }  # fmt: skip
    assert all(r["decision"] in ("accept", "reject", "review") for r in rows)
    err = capsys.readouterr().err
    assert "Classified 5 image(s)" in err and "unreadable:" in err and "broken.jpg" in err
    assert main(["predict", str(trained_run), str(tmp_path / "missing")]) == 2


def test_labelled_parts_are_exported_as_training_data(
    trained_run: Path,
    tmp_path: Path,
    service_client,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    with service_client(trained_run, db_url=url) as client:
        data_dir = client.app.state.settings.data_dir
        ids = {}
        for seed in range(4):
            r = client.post(
                "/predict", files=[("files", (f"{seed}.png", png_bytes(seed), "image/png"))]
            )
            ids[seed] = r.json()["data"][0]["id"]
        again = client.post("/predict", files=[("files", ("0b.png", png_bytes(0), "image/png"))])
        ids["again"] = again.json()["data"][0]["id"]  # the same image as seed 0, uploaded again
        for key, label in (
            (0, "good"),
            (1, "dent"),
            (1, "scratch"),
            (2, "good"),
            ("again", "dent"),
        ):
            assert (
                client.put(f"/predictions/{ids[key]}/label", json={"label": label}).status_code
                == 200
            )
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("MAXMIN_DATA_DIR", str(data_dir))
    out = tmp_path / "inspected"
    assert main(["export-labels", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "labels.csv").open()))
    by_id = {int(r["prediction_id"]): r for r in rows}
    # Seed 0's image once, with its latest label (the re-upload's); seed 1's correction wins;
    # seed 3 was never labelled.
    assert set(by_id) == {ids[1], ids[2], ids["again"]}
    assert by_id[ids["again"]]["label"] == "dent" and by_id[ids[1]]["label"] == "scratch"
    assert all((out / r["path"]).is_file() and r["path"].startswith(r["label"] + "/") for r in rows)
    assert all(json.loads(r["model_versions"]).keys() == {"baseline", "maxmin"} for r in rows)
    assert main(["export-labels", "--out", str(out)]) == 2  # never into a folder with files

    from inspectlib.datasets import scan_source

    entries, _ = scan_source(out / "labels.csv")
    assert sorted(e.label for e in entries) == ["dent", "good", "scratch"]


def test_the_kept_answers_choose_the_same_point_as_the_probabilities() -> None:
    rng = np.random.default_rng(3)
    prob = rng.dirichlet(np.ones(3), size=200)
    y = rng.integers(0, 3, 200)
    for target, good in ((0.0, 0), (0.02, 0), (0.3, None)):
        kept = answers_of(prob, y)
        a = choose_operating_point(prob, y, target, good)
        b = choose_from_answers(kept["confidence"], kept["predicted"], kept["truth"], target, good)
        assert b["threshold"] == pytest.approx(a["threshold"], abs=1e-6)
        assert b["validation"] == pytest.approx(a["validation"])


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the shared run, for tests that change it."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def test_an_admin_changes_a_runs_target_and_the_service_follows(
    run: Path,
    tmp_path: Path,
    service_client,  # noqa: ANN001
) -> None:
    # Answers with known errors (the tiny run makes none): wrong at 0.6 and 0.8, so an error
    # rate of 0 among accepted parts needs a threshold of 0.9.
    kept = json.loads((run / ANSWERS_FILE).read_text())
    val = {"confidence": [0.9, 0.6, 0.8, 0.7, 0.95, 0.8], "predicted": [0, 0, 0, 1, 0, 1]}
    for name in kept:
        kept[name]["validation"] = val | {"truth": [0, 1, 1, 1, 0, 1]}
    (run / ANSWERS_FILE).write_text(json.dumps(kept))
    url = f"sqlite:///{tmp_path / 'db' / 'maxmin.db'}"
    with service_client(None, db_url=url, reload_seconds=0.2, runs_dir=tmp_path / "none") as client:
        with client.app.state.sessions() as session:
            run_id = register_run(session, run).id
        served = client.app.state.models
        deadline = time.monotonic() + 60
        while served.classifier is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        html_before = (run / "report.html").stat().st_mtime_ns
        r = client.put(f"/runs/{run_id}/operating-point", json={"max_escape_rate": 1.0})
        assert r.status_code == 200, r.text
        assert r.json()["thresholds"] == {"baseline": 0.0, "maxmin": 0.0}  # anything goes
        assert r.json()["report_page"] == "updated"
        assert (run / "report.html").stat().st_mtime_ns > html_before
        while served.classifier.thresholds != {"baseline": 0.0, "maxmin": 0.0}:
            assert time.monotonic() < deadline, served.classifier.thresholds
            time.sleep(0.1)
        r = client.put(f"/runs/{run_id}/operating-point", json={"max_escape_rate": 0.0})
        strict = r.json()["thresholds"]
        assert strict == {"baseline": 0.9, "maxmin": 0.9}
        report = json.loads((run / "report.json").read_text())
        point = report["models"]["maxmin"]["operating_point"]
        assert point["target"] == 0.0 and point["set_by"] == "test-admin"
        assert point["threshold"] == strict["maxmin"] and "test" in point
        with client.app.state.sessions() as session:  # the database's copy follows
            assert (
                session.get(Run, run_id).report["models"]["maxmin"]["operating_point"]["threshold"]
                == strict["maxmin"]
            )
        while served.classifier.thresholds != strict:
            assert time.monotonic() < deadline, served.classifier.thresholds
            time.sleep(0.1)
        # Bad requests change nothing.
        assert (
            client.put(f"/runs/{run_id}/operating-point", json={"max_escape_rate": 1.5}).status_code
            == 422
        )
        assert (
            client.put("/runs/999/operating-point", json={"max_escape_rate": 0.1}).status_code
            == 404
        )
        (run / ANSWERS_FILE).unlink()
        r = client.put(f"/runs/{run_id}/operating-point", json={"max_escape_rate": 0.1})
        assert r.status_code == 409 and ANSWERS_FILE in r.json()["detail"]
        assert json.loads((run / "report.json").read_text()) == report


def test_the_target_changes_from_the_command_line(run: Path, capsys) -> None:  # noqa: ANN001
    assert main(["operating-point", str(run), "--max-escape-rate", "1"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "threshold 0.0000" in out and "report.html" in out
    report = json.loads((run / "report.json").read_text())
    assert report["models"]["baseline"]["operating_point"]["target"] == 1.0
    (run / ANSWERS_FILE).unlink()
    assert main(["operating-point", str(run), "--max-escape-rate", "0.1"]) == 2
    assert ANSWERS_FILE in capsys.readouterr().err
