"""Champion and challenger: a new run answers in shadow, the evidence on labelled parts, the
promotion rule, promote and roll back with who and when, and the run history."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.config import Settings
from app.core.db import command_session, upgrade
from app.core.inference import ServedRun
from app.core.storage import ImageStore
from app.crud.live_ab import challenger_stats
from app.crud.predictions import set_label
from app.crud.runs import challenger, champion, register_run
from app.crud.writes import NewImage, NewOutput, NewShadow, PredictionBatch, store_batches
from app.main import create_app
from app.tables import Run, RunEvent, ShadowPrediction, utcnow
from inspectlib.decision import Decision
from tests.helpers import make_key, png_bytes, train_small_run


@pytest.fixture(scope="module")
def runs(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The champion (the shared run) and a retrained challenger with the same classes."""
    other = train_small_run(tmp_path_factory.mktemp("challenger"), epochs=2)
    return {"champion": trained_run.resolve(), "challenger": other.resolve()}


def _client(db_url: str, tmp_path: Path, **settings: object) -> TestClient:
    upgrade(db_url)
    options = {
        "data_dir": tmp_path / "var",
        "database_url": db_url,
        "runs_dir": tmp_path / "no-runs",
        "device": "cpu",
        "reload_seconds": 0.2,
    } | settings
    key = make_key(db_url, "admin", "alice")
    return TestClient(create_app(Settings(**options)), headers={"X-API-Key": key})


def _register(client: TestClient, run_dir: Path) -> int:
    with client.app.state.sessions() as session:
        return register_run(session, run_dir, actor="test").id


def _until(check, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_new_run_answers_in_shadow_then_is_promoted_and_rolled_back(
    db_url: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    champ_versions = {
        n: m.version for n, m in ServedRun(runs["champion"], ["baseline", "maxmin"]).models.items()
    }
    chal_versions = {
        n: m.version
        for n, m in ServedRun(runs["challenger"], ["baseline", "maxmin"]).models.items()
    }
    assert champ_versions != chal_versions
    with _client(db_url, tmp_path, promote_min_labelled=5, promote_margin=1.0) as client:
        champ_id = _register(client, runs["champion"])
        _until(lambda: client.get("/readyz").json().get("run") == str(runs["champion"]))
        chal_id = _register(client, runs["challenger"])  # a champion serves: this one challenges
        shadow = client.app.state.shadow
        # A model process of its own starts for it: slow on a busy machine.
        _until(lambda: shadow.classifier is not None, timeout=180)
        assert shadow.run_id == chal_id

        files = [("files", (f"{i}.png", png_bytes(i))) for i in range(6)]
        r = client.post("/predict", files=files)
        assert r.status_code == 200, r.text
        answers = r.json()["data"]
        # The line gets the champion's answers only.
        for a in answers:
            assert {n: v["model_version"] for n, v in a["results"].items()} == champ_versions
        with client.app.state.sessions() as session:
            rows = session.execute(select(ShadowPrediction)).scalars().all()
            assert sorted(s.prediction_id for s in rows) == sorted(a["id"] for a in answers)
            assert {s.run_id for s in rows} == {chal_id}
            assert all(s.versions == chal_versions for s in rows)
            assert all(s.decision in ("accept", "reject", "review") for s in rows)

        body = client.get("/runs/challenger").json()
        assert body["champion"]["id"] == champ_id and body["challenger"]["id"] == chal_id
        assert body["evidence"]["labelled"] == 0
        assert not body["evidence"]["rule"]["ready"]
        assert "not enough evidence" in body["evidence"]["rule"]["verdict"]

        for a in answers[:5]:
            r = client.put(f"/predictions/{a['id']}/label", json={"label": "scratch"})
            assert r.status_code == 200, r.text
        ev = client.get("/runs/challenger").json()["evidence"]
        assert ev["labelled"] == 5
        assert set(ev["models"]) == {"baseline", "maxmin"}
        for m in ev["models"].values():
            assert m["parts"] == 5
            assert m["only_champion_correct"] + m["only_challenger_correct"] <= 5
        # Five parts cannot make McNemar significant, and the margin is the widest: ready.
        assert ev["rule"]["ready"], ev["rule"]

        # Only the challenger can be promoted; a promotion switches the line to it.
        assert client.post(f"/runs/{champ_id}/promote").status_code == 409
        r = client.post(f"/runs/{chal_id}/promote")
        assert r.status_code == 202, r.text
        _until(lambda: client.get("/readyz").json().get("run") == str(runs["challenger"]))
        _until(lambda: shadow.classifier is None)  # promoted: no longer in shadow
        r = client.post("/predict", files=files[:1])
        assert r.json()["data"][0]["results"]["maxmin"]["model_version"] == chal_versions["maxmin"]

        r = client.post("/runs/rollback")
        assert r.status_code == 202, r.text
        assert r.json()["champion"]["id"] == champ_id
        _until(lambda: client.get("/readyz").json().get("run") == str(runs["champion"]))

        hist = client.get("/runs/history").json()
        served = [(p["run"]["id"], p["action"], p["by"]) for p in hist["served"]]
        assert served[:2] == [(champ_id, "rollback", "alice"), (chal_id, "promote", "alice")]
        assert served[2][0] == champ_id  # served first, by default
        promoted = hist["served"][1]
        assert promoted["until"] is not None and promoted["from"] < promoted["until"]
        assert promoted["models"]["maxmin"]["predictions"] == 1  # the one answered meanwhile
        actions = [e["action"] for e in hist["events"]]
        assert "challenge" in actions
        # The page shows the same history.
        page = client.get("/history")
        assert page.status_code == 200 and "alice" in page.text and "rollback" in page.text


def test_shadow_switched_off_loads_and_stores_nothing(
    db_url: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    with _client(db_url, tmp_path, shadow=False) as client:
        _register(client, runs["champion"])
        _until(lambda: client.get("/readyz").json().get("run") == str(runs["champion"]))
        _register(client, runs["challenger"])
        time.sleep(1.0)  # several follower rounds
        assert client.app.state.shadow.classifier is None
        assert (
            client.post("/predict", files=[("files", ("a.png", png_bytes(1)))]).status_code == 200
        )
        with client.app.state.sessions() as session:
            assert session.execute(select(func.count(ShadowPrediction.id))).scalar_one() == 0
        body = client.get("/runs/challenger").json()
        assert body["shadow"]["enabled"] is False and body["evidence"]["labelled"] == 0


def _stored_pairs(
    session,
    store: ImageStore,
    chal: Run,
    parts: list[tuple[str, str, str]],  # noqa: ANN001
) -> None:
    """Store one prediction per part with the champion's and the challenger's decisions, then
    label it: ``parts`` holds (truth, champion decision, challenger decision)."""
    items, decisions, shadows = [], [], []
    for i, (_, champ, chal_decision) in enumerate(parts):
        said = "good" if champ == "accept" else "scratch"
        chal_said = "good" if chal_decision == "accept" else "scratch"
        data = png_bytes(1000 + i)
        image = NewImage(f"{i:064x}", data, "image/png", 32, 32, f"{i}.png")
        outputs = [
            NewOutput(m, f"{m}-v1", said, 0.9, {"good": 0.5, "scratch": 0.5}, 1.0)
            for m in ("baseline", "maxmin")
        ]
        items.append((image, outputs))
        decisions.append(Decision(champ, "test"))
        shadows.append(
            NewShadow(
                chal.id,
                chal_decision,
                {"baseline": chal_said, "maxmin": chal_said},
                {"baseline": 0.9, "maxmin": 0.9},
                {"baseline": "baseline-v2", "maxmin": "maxmin-v2"},
            )
        )
    batch = PredictionBatch(items, ["good", "scratch"], None, None, decisions, shadows)
    stored = store_batches(session, store, [batch])[0]
    for p, (truth, _, _) in zip(stored, parts, strict=True):
        set_label(session, p.id, truth, "inspector")


def _challenger_run(session) -> Run:  # noqa: ANN001
    run = Run(
        run_dir="/runs/challenger",
        created_at=utcnow(),
        data_fingerprint="x",
        verdict="",
        model_versions={},
        report={},
        challenger_since=utcnow() - timedelta(minutes=1),
    )
    session.add(run)
    session.commit()
    return run


@pytest.mark.parametrize(
    ("chal_escapes", "ready", "says"),
    [(0, True, "ready to promote"), (12, False, "keep the champion")],
)
def test_the_promotion_rule_counts_escapes_on_labelled_defective_parts(
    db_url: str, tmp_path: Path, chal_escapes: int, ready: bool, says: str
) -> None:
    upgrade(db_url)
    store = ImageStore(tmp_path / "images")
    # 40 defective parts both runs reject, but the challenger accepts (lets escape) some; 60 good
    # parts both accept.
    parts = [("scratch", "reject", "accept" if i < chal_escapes else "reject") for i in range(40)]
    parts += [("good", "accept", "accept") for _ in range(60)]
    with command_session(db_url, migrate=False) as session:
        chal = _challenger_run(session)
        _stored_pairs(session, store, chal, parts)
        ev = challenger_stats(session, chal, None, "good", min_labelled=100, margin=0.05)
        assert ev["labelled"] == 100
        esc = ev["rates"]["escape_rate"]
        assert esc["champion"]["value"] == 0.0
        assert esc["challenger"]["value"] == pytest.approx(chal_escapes / 40)
        assert ev["rates"]["false_reject_rate"]["challenger"]["value"] == 0.0
        assert ev["rule"]["ready"] is ready, ev["rule"]
        assert says in ev["rule"]["verdict"]
        # The accuracy of each model, paired: the challenger's escapes are its wrong answers.
        m = ev["models"]["maxmin"]
        assert m["only_champion_correct"] == chal_escapes and m["only_challenger_correct"] == 0
        # Fewer labelled parts than the rule asks for: never ready, whatever the rates.
        short = challenger_stats(session, chal, None, "good", min_labelled=101, margin=0.05)
        assert not short["rule"]["ready"] and "not enough evidence" in short["rule"]["verdict"]


def test_a_run_registered_while_another_serves_becomes_the_challenger(
    db_url: str, runs: dict[str, Path]
) -> None:
    upgrade(db_url)
    with command_session(db_url, migrate=False) as session:
        first = register_run(session, runs["champion"])
        assert first.challenger_since is None  # nothing serves yet: no challenge
        from app.crud.runs import choose_to_serve

        choose_to_serve(session, first, "bob")
        second = register_run(session, runs["challenger"], actor="carol")
        assert challenger(session).id == second.id and champion(session).id == first.id
        register_run(session, runs["challenger"])  # registering again changes nothing
        events = session.execute(select(RunEvent).order_by(RunEvent.id)).scalars().all()
        assert [(e.run_id, e.action, e.actor) for e in events] == [
            (first.id, "serve", "bob"),
            (second.id, "challenge", "carol"),
        ]
