"""The service against real models and a real database: SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.config import Settings
from app.core.db import SchemaError, make_engine, upgrade
from app.main import create_app
from app.tables import LabelEvent, ModelOutput, Prediction, StoredImage
from tests.helpers import (
    CLASSES,
    bomb_png,
    flat_png,
    image_as,
    jpeg_bytes,
    make_key,
    malformed_corpus,
    png_bytes,
)


@pytest.fixture(scope="module")
def run_dir(trained_run: Path) -> Path:
    return trained_run


@pytest.fixture
def settings(db_url: str, run_dir: Path, tmp_path: Path) -> Settings:
    upgrade(db_url)
    return Settings(
        data_dir=tmp_path / "var",
        database_url=db_url,
        run_dir=run_dir,
        device="cpu",
        max_files=4,
        max_file_bytes=200_000,
        max_body_bytes=1_000_000,
        max_image_pixels=1_000_000,
    )


@pytest.fixture
def client(settings: Settings, db_url: str) -> Iterator[TestClient]:
    """The service with an admin key on every request (roles are tested in test_auth.py)."""
    with TestClient(create_app(settings), headers={"X-API-Key": make_key(db_url)}) as c:
        yield c


def counts(client: TestClient) -> tuple[int, int, int, int, int]:
    """Rows in each table and files in the image store."""
    engine = client.app.state.engine
    with engine.connect() as conn:
        rows = [
            conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (StoredImage, Prediction, ModelOutput, LabelEvent)
        ]
    files = sum(1 for p in client.app.state.store.root.rglob("*") if p.is_file())
    return (*rows, files)


def predict(client: TestClient, *images: bytes, **data: str):  # noqa: ANN201
    files = [("files", (f"part{i}.png", img, "image/png")) for i, img in enumerate(images)]
    return client.post("/predict", files=files, data=data)


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert set(ready.json()["models"]) == {"baseline", "maxmin"}


def test_predict_many_files_stores_each_once(client: TestClient) -> None:
    a, b = png_bytes(1), png_bytes(2, brightness=200)
    r = predict(client, a, b, a, source="line-3", part_id="P-17")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 3
    first = body["data"][0]
    assert set(first["results"]) == {"baseline", "maxmin"}
    for answer in first["results"].values():
        assert answer["label"] in CLASSES
        assert abs(sum(answer["probabilities"].values()) - 1) < 1e-3
        assert answer["confidence"] == pytest.approx(
            max(answer["probabilities"].values()), abs=1e-5
        )
        assert answer["latency_ms"] > 0 and ":" in answer["model_version"]
    assert first["agree"] == (
        first["results"]["baseline"]["label"] == first["results"]["maxmin"]["label"]
    )
    assert first["source"] == "line-3" and first["part_id"] == "P-17"
    # Two distinct images: two files and two image rows; three predictions, six model outputs.
    assert counts(client) == (2, 3, 6, 0, 2)
    assert body["data"][0]["image_sha256"] == body["data"][2]["image_sha256"]
    stored = client.get(first["image_url"])
    assert stored.status_code == 200 and stored.content == a
    assert stored.headers["content-type"] == "image/png"


def test_predict_raw_body(client: TestClient) -> None:
    r = client.post(
        "/predict?source=cam-2", content=jpeg_bytes(3), headers={"Content-Type": "image/jpeg"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["source"] == "cam-2"
    assert counts(client)[:2] == (1, 1)


def test_same_image_classifies_the_same_way(client: TestClient) -> None:
    img = png_bytes(7)
    one = predict(client, img).json()["data"][0]["results"]
    two = client.post("/predict", content=img, headers={"Content-Type": "image/png"}).json()
    assert one["maxmin"]["probabilities"] == two["data"][0]["results"]["maxmin"]["probabilities"]


def raw_multipart(client: TestClient, filename: bytes, data: bytes):  # noqa: ANN201
    """A multipart upload written byte by byte, as a client that escapes nothing would send it."""
    head = b'--b0undary\r\nContent-Disposition: form-data; name="files"; filename="'
    body = head + filename + b'"\r\nContent-Type: image/png\r\n\r\n' + data
    body += b"\r\n--b0undary--\r\n"
    ctype = "multipart/form-data; boundary=b0undary"
    return client.post("/predict", content=body, headers={"Content-Type": ctype})


BAD_UPLOADS = [
    ("not an image", lambda c: predict(c, b"hello, I am text"), 422, "not a recognised image"),
    ("GIF", lambda c: predict(c, image_as("GIF")), 415, "GIF images are not accepted"),
    (
        "NUL in file name",
        lambda c: raw_multipart(c, b"a\x00b.png", png_bytes(1)),
        422,
        "contains a control character",
    ),
    ("WebP", lambda c: predict(c, image_as("WEBP")), 415, "WEBP images are not accepted"),
    ("EPS", lambda c: predict(c, image_as("EPS")), 415, "EPS images are not accepted"),
    ("truncated", lambda c: predict(c, png_bytes(1)[:80]), 422, "corrupt or truncated"),
    ("bomb", lambda c: predict(c, bomb_png()), 413, "too large"),
    ("over pixel limit", lambda c: predict(c, flat_png(1100)), 413, "more than the limit"),
    ("empty file", lambda c: predict(c, b""), 422, "is empty"),
    ("one bad among good", lambda c: predict(c, png_bytes(1), b"xx"), 422, "'part1.png'"),
    ("too many files", lambda c: predict(c, *[png_bytes(i) for i in range(5)]), 413, "Too many"),
    ("file over limit", lambda c: predict(c, jpeg_bytes(0, size=600)), 413, "larger than 200000"),
    (
        "body over limit",
        lambda c: c.post(
            "/predict", content=b"x" * 1_100_000, headers={"Content-Type": "image/png"}
        ),
        413,
        "limit",
    ),
    (
        "no files field",
        lambda c: c.post(
            "/predict", data={"source": "x"}, files=[("other", ("a.png", b"1", "image/png"))]
        ),
        422,
        "no images",
    ),
    (
        "empty raw body",
        lambda c: c.post("/predict", content=b"", headers={"Content-Type": "image/png"}),
        400,
        "empty",
    ),
    ("wrong type", lambda c: c.post("/predict", json={"image": "x"}), 415, "multipart"),
    (
        "truncated multipart",
        lambda c: c.post(
            "/predict",
            content=b'--xyz\r\nContent-Disposition: form-data; name="files"\r\n\r\nabc',
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        ),
        422,
        "no images",
    ),
    (
        "no boundary",
        lambda c: c.post(
            "/predict", content=b"abc", headers={"Content-Type": "multipart/form-data"}
        ),
        400,
        "boundary",
    ),
]


@pytest.mark.parametrize(
    ("case", "send", "status", "message"), BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS]
)
def test_bad_uploads_get_clear_errors_and_store_nothing(
    client: TestClient,
    case: str,
    send,
    status: int,
    message: str,  # noqa: ANN001
) -> None:
    predict(client, png_bytes(99))  # something stored before, which must survive untouched
    before = counts(client)
    r = send(client)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert message in (detail if isinstance(detail, str) else str(detail))
    assert counts(client) == before
    assert client.get("/readyz").status_code == 200


def test_labels_keep_history_and_are_validated(client: TestClient) -> None:
    pid = predict(client, png_bytes(5)).json()["data"][0]["id"]
    r = client.put(f"/predictions/{pid}/label", json={"label": "dent", "labelled_by": "anna"})
    assert r.status_code == 200 and r.json()["label"] == "dent"
    r = client.put(f"/predictions/{pid}/label", json={"label": "scratch", "labelled_by": "ben"})
    body = r.json()
    assert body["label"] == "scratch" and body["labelled_by"] == "ben"
    assert [h["label"] for h in body["history"]] == ["dent", "scratch"]
    bad = client.put(f"/predictions/{pid}/label", json={"label": "rust"})
    assert bad.status_code == 422 and "'rust' is not one of the classes" in bad.json()["detail"]
    missing = client.put("/predictions/999999/label", json={"label": "dent"})
    assert missing.status_code == 404 and "999999" in missing.json()["detail"]
    malformed = client.put(
        f"/predictions/{pid}/label",
        content=b"{label: ",
        headers={"Content-Type": "application/json"},
    )
    assert malformed.status_code == 422
    assert client.get(f"/predictions/{pid}").json()["label"] == "scratch"
    assert counts(client)[3] == 2


def test_listing_filters_and_pages(client: TestClient) -> None:
    ids = [
        predict(client, png_bytes(i), source=f"line-{i % 2}").json()["data"][0]["id"]
        for i in range(6)
    ]
    client.put(f"/predictions/{ids[0]}/label", json={"label": "good"})
    assert client.get("/predictions").json()["count"] == 6
    assert client.get("/predictions?source=line-1").json()["count"] == 3
    assert [p["id"] for p in client.get("/predictions?labelled=true").json()["data"]] == [ids[0]]
    assert client.get("/predictions?labelled=false").json()["count"] == 5
    page = client.get("/predictions?limit=4&skip=4").json()
    assert page["count"] == 6 and [p["id"] for p in page["data"]] == ids[1::-1]
    everything = client.get("/predictions").json()["data"]
    disagree = {p["id"] for p in everything if not p["agree"]}
    assert {p["id"] for p in client.get("/predictions?disagree=true").json()["data"]} == disagree
    for cls in CLASSES:
        hit = {p["id"] for p in everything if cls in {r["label"] for r in p["results"].values()}}
        assert {p["id"] for p in client.get(f"/predictions?predicted={cls}").json()["data"]} == hit
    assert client.get("/predictions?since=2999-01-01T00:00:00Z").json()["count"] == 0
    assert client.get("/predictions?until=2999-01-01T00:00:00Z").json()["count"] == 6
    assert client.get("/predictions?limit=0").status_code == 422
    assert client.get("/predictions?since=yesterday").status_code == 422
    assert client.get("/predictions/424242").status_code == 404
    # Found by the fuzzer: ids beyond the id column's range were a database error (500).
    assert client.get("/predictions/9223372036854775808").status_code == 422
    assert client.put("/predictions/0/label", json={"label": "dent"}).status_code == 422
    assert client.get("/reports/99999999999").status_code == 422
    # Also found by the fuzzer: values the database cannot hold are 422s, on both databases.
    for query in (
        "skip=99999999999999999999",
        "since=0001-01-01T00:00:00%2B05:00",
        "until=9999-12-31T23:59:59-05:00",
        "source=a%00b",
        "predicted=%00",
    ):
        r = client.get(f"/predictions?{query}")
        assert r.status_code == 422, (query, r.text)
    assert client.get("/stats?since=0001-01-01T00:00:00%2B05:00").status_code == 422
    nul = client.put(f"/predictions/{ids[0]}/label", json={"label": "go\u0000od"})
    assert nul.status_code == 422
    assert predict(client, png_bytes(1), source="line\x001").status_code == 422
    assert client.get("/images/" + "0" * 64).status_code == 404
    assert client.get("/images/not-a-hash").status_code == 422


def test_stats_match_the_labels(client: TestClient) -> None:
    preds = [
        predict(client, png_bytes(i, brightness=60 + 40 * i)).json()["data"][0] for i in range(5)
    ]
    truth = ["dent", "good", "scratch", "good", "dent"]
    for p, label in zip(preds[:4], truth, strict=False):  # the last one stays unlabelled
        client.put(f"/predictions/{p['id']}/label", json={"label": label})
    s = client.get("/stats").json()
    assert s["predictions"] == 5 and s["labelled"] == 4 and s["unlabelled"] == 1
    assert s["agreement_rate"] == pytest.approx(sum(p["agree"] for p in preds) / 5)
    for name in ("baseline", "maxmin"):
        right = sum(
            p["results"][name]["label"] == t for p, t in zip(preds, truth[:4], strict=False)
        )
        m = s["models"][name]
        assert m["correct"] == right and m["labelled"] == 4
        assert m["accuracy"]["value"] == pytest.approx(right / 4)
        assert m["accuracy"]["low"] <= right / 4 <= m["accuracy"]["high"]
        assert sum(map(sum, m["confusion_matrix"])) == 4
        assert m["latency_ms_p50"] > 0
    paired = s["paired"]
    only_b = sum(
        p["results"]["maxmin"]["label"] == t != p["results"]["baseline"]["label"]
        for p, t in zip(preds, truth[:4], strict=False)
    )
    assert paired["only_b_correct"] == only_b
    assert client.get("/stats?since=2999-01-01T00:00:00Z").json()["predictions"] == 0


def test_stats_count_only_the_served_model_versions(client: TestClient) -> None:
    """After a retrain, the old models' answers must not be mixed into the new models' figures."""
    from sqlalchemy import update

    from app.tables import ModelOutput

    preds = [predict(client, png_bytes(i)).json()["data"][0] for i in range(5)]
    for p in preds[:4]:
        client.put(f"/predictions/{p['id']}/label", json={"label": "good"})
    old = [preds[0]["id"], preds[4]["id"]]  # as if an earlier run's models had classified these
    with client.app.state.sessions() as session:
        session.execute(
            update(ModelOutput)
            .where(ModelOutput.prediction_id.in_(old))
            .values(model_version="baseline-seed0:0123456789ab")
        )
        session.commit()
    served = client.get("/stats").json()
    assert served["predictions"] == 3 and served["labelled"] == 3 and served["unlabelled"] == 0
    assert served["labelled_other_versions"] == 1  # preds[0]; preds[4] has no label
    assert served["versions"] == {
        n: preds[1]["results"][n]["model_version"] for n in served["versions"]
    }
    for name, m in served["models"].items():
        assert m["labelled"] == 3
        right = sum(p["results"][name]["label"] == "good" for p in preds[1:4])
        assert m["correct"] == right
    every = client.get("/stats?scope=all").json()
    assert every["predictions"] == 5 and every["labelled"] == 4 and every["versions"] is None
    assert every["labelled_other_versions"] == 0
    assert client.get("/stats?scope=some").status_code == 422
    page = client.get("/dashboard").text
    assert "1 labelled image(s) classified by earlier model versions are left out" in page


def test_reports_api_and_page(client: TestClient, run_dir: Path) -> None:
    from app.crud.runs import register_run

    assert client.get("/reports").json()["count"] == 0
    with client.app.state.sessions() as session:
        run = register_run(session, run_dir)
        register_run(session, run_dir)  # registering again updates, never duplicates
    listed = client.get("/reports").json()
    assert listed["count"] == 1 and set(listed["data"][0]["model_versions"]) == {
        "baseline",
        "maxmin",
    }
    full = client.get(f"/reports/{run.id}").json()
    assert full["report"]["verdict"] == full["verdict"]
    page = client.get(f"/reports/{run.id}", headers={"Accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html") and "<svg" in page.text
    assert client.get("/reports/77").status_code == 404
    dash = client.get("/dashboard")
    assert dash.status_code == 200 and full["verdict"][:30] in dash.text


def test_pages_render(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="upload"' in page.text
    for cls in CLASSES:
        assert cls in page.text
    assert client.get("/dashboard").status_code == 200
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_unmigrated_database_is_refused(tmp_path: Path, run_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    app = create_app(Settings(data_dir=tmp_path, database_url=url, run_dir=run_dir))
    with pytest.raises(SchemaError, match="maxmin-inspect db upgrade"):
        with TestClient(app):
            pass


def test_not_ready_without_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url, runs_dir=tmp_path / "none")
    with TestClient(create_app(settings), headers={"X-API-Key": make_key(url)}) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "maxmin-inspect train" in r.json()["detail"]
        p = c.post("/predict", files=[("files", ("a.png", png_bytes(), "image/png"))])
        assert p.status_code == 503 and "maxmin-inspect train" in p.json()["detail"]
        assert c.get("/").status_code == 200


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    make_engine(url).connect().close()
    assert sqlite3.connect(tmp_path / "w.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_server_timing_says_where_time_goes(client: TestClient) -> None:
    r = predict(client, png_bytes(11))
    parts = dict(p.strip().split(";", 1) for p in r.headers["Server-Timing"].split(","))
    assert {"parse", "decode", "preprocess", "queue", "model", "db", "serialize", "batch"} <= set(
        parts
    )
    ms = {k: float(v.split("=")[1]) for k, v in parts.items() if v.startswith("dur=")}
    assert ms["model"] > 0 and ms["preprocess"] > 0
    # db in its parts: the wait for the writer, the new image's file, the lock, the statements
    db_parts = ("db_wait", "db_files", "db_lock", "db_sql")
    assert ms["db_sql"] > 0 and ms["db_files"] > 0
    assert sum(ms[k] for k in db_parts) == pytest.approx(ms["db"], abs=0.01)


def test_group_commit_isolates_a_failing_request(client: TestClient) -> None:
    import hashlib

    from sqlalchemy.exc import IntegrityError

    from app.crud.writes import NewImage, NewOutput, PredictionBatch

    def batch(seed: int, label: str | None) -> PredictionBatch:
        data = png_bytes(seed)
        image = NewImage(hashlib.sha256(data).hexdigest(), data, "image/png", 32, 32, None)
        out = NewOutput("baseline", "v1", label, 0.9, {"dent": 0.9}, 1.0)  # type: ignore[arg-type]
        return PredictionBatch([(image, [out])], CLASSES, "line-9", None)

    writer = client.app.state.writer
    batches = [batch(501, "dent"), batch(502, None), batch(503, "good")]  # None breaks NOT NULL
    futures = [writer.submit(b) for b in batches]
    assert futures[0].result(timeout=30).predictions[0].id > 0
    with pytest.raises(IntegrityError):
        futures[1].result(timeout=30)
    assert futures[2].result(timeout=30).predictions[0].id > 0
    # Exactly the two good requests were stored, with their files; the failed one left nothing.
    assert counts(client) == (2, 2, 2, 0, 2)
    assert not client.app.state.store.exists(batches[1].items[0][0].sha256)


def test_metrics_and_request_ids(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="maxmin_inspect.access")
    body = predict(client, png_bytes(21), png_bytes(22)).json()
    client.get("/predictions/99999")
    echoed = client.get("/healthz", headers={"X-Request-ID": "line3-cam2-000042"})
    assert echoed.headers["X-Request-ID"] == "line3-cam2-000042"
    fresh = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert len(fresh.headers["X-Request-ID"]) == 32  # replaced, never echoed unchecked
    text = client.get("/metrics").text
    assert 'maxmin_http_requests_total{method="POST",route="/predict",status="200"} 1.0' in text
    assert 'maxmin_http_errors_total{route="/predictions/{prediction_id}",status="404"} 1.0' in text
    for name in ("baseline", "maxmin"):
        labels = [p["results"][name]["label"] for p in body["data"]]
        for label in set(labels):
            series = f'maxmin_predictions_total{{label="{label}",model="{name}"}}'
            assert f"{series} {labels.count(label)}.0" in text
        assert f'maxmin_model_seconds_per_image_count{{model="{name}"}} 2.0' in text
    assert "maxmin_http_request_seconds_bucket" in text
    ids = [getattr(r, "fields", {}).get("route") for r in caplog.records]
    assert "/predict" in ids


def test_json_log_lines_carry_the_request_id() -> None:
    import json
    import logging

    from app.core.observability import JsonFormatter, request_id_var

    token = request_id_var.set("abc123")
    try:
        record = logging.LogRecord(
            "maxmin_inspect.access", logging.INFO, __file__, 1, "GET %s", ("/x",), None
        )
        record.fields = {"status": 200}
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "abc123" and line["message"] == "GET /x" and line["status"] == 200


def test_json_log_lines_are_all_written_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The logging thread writes every line, each thread's in the order made, a warning without
    waiting for the next round, and what still waits when the handler closes."""
    import io
    import json
    import logging
    import threading

    from app.core.observability import JsonLinesHandler

    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    handler = JsonLinesHandler()
    handler.FLUSH_SECONDS = 60  # only a warning, or closing, writes in this test
    logger = logging.getLogger("maxmin_inspect.test_lines")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:

        def burst(k: int) -> None:
            for i in range(500):
                logger.info("line %d %d", k, i, extra={"fields": {"k": k, "i": i}})

        threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        logger.warning("a warning")
        deadline = time.monotonic() + 10
        while "a warning" not in err.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "a warning" in err.getvalue()  # written though the round is a minute away
        logger.info("the last line")
    finally:
        logger.removeHandler(handler)
        handler.close()
    lines = [json.loads(x) for x in err.getvalue().splitlines()]
    assert lines[-1]["message"] == "the last line"  # closing wrote what waited
    for k in range(4):
        assert [e["i"] for e in lines if e.get("k") == k] == list(range(500))
    handler.close()  # logging closes handlers more than once


@pytest.mark.parametrize("case", range(10))
def test_malformed_image_corpus(client: TestClient, case: int) -> None:
    name, data, allowed = malformed_corpus()[case]
    r = client.post("/predict", files=[("files", ("x.bin", data, "application/octet-stream"))])
    assert r.status_code in allowed, (name, r.status_code, r.text)
    if r.status_code != 200:
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
