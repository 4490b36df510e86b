"""Access control: each role's boundary on every route, CSRF on cookie sessions, keys."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.config import Settings
from app.core.db import upgrade
from app.crud.runs import register_run
from app.main import create_app
from app.tables import ApiKey, LabelEvent, Prediction, StoredImage
from maxmin_inspect.main import main
from tests.helpers import make_key, png_bytes

ROLES = ["line", "inspector", "manager", "admin"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("auth")
    run_dir = trained_run
    url = f"sqlite:///{root / 'var' / 'maxmin.db'}"
    upgrade(url)
    keys = {role: make_key(url, role) for role in ROLES}
    settings = Settings(data_dir=root / "var", database_url=url, run_dir=run_dir, device="cpu")
    with TestClient(create_app(settings)) as client:
        with client.app.state.sessions() as session:
            run_id = register_run(session, run_dir).id
        made = client.post(
            "/predict",
            headers={"X-API-Key": keys["line"]},
            files=[("files", ("a.png", png_bytes(3), "image/png"))],
        ).json()
        pred = made["data"][0]
        yield {
            "client": client,
            "keys": keys,
            "url": url,
            "pid": pred["id"],
            "sha": pred["image_sha256"],
            "run_id": run_id,
        }


# (method, path, the lowest role allowed, request arguments)
ROUTES = [
    ("POST", "/predict", "line", {"files": [("files", ("b.png", png_bytes(4), "image/png"))]}),
    ("GET", "/predictions", "inspector", {}),
    ("GET", "/predictions/{pid}", "inspector", {}),
    ("PUT", "/predictions/{pid}/label", "inspector", {"json": {"label": "dent"}}),
    ("GET", "/images/{sha}", "inspector", {}),
    ("GET", "/stats", "manager", {}),
    ("GET", "/reports", "manager", {}),
    ("GET", "/reports/{run_id}", "manager", {}),
    ("GET", "/metrics", "manager", {}),
    ("GET", "/training/datasets", "admin", {}),
    ("GET", "/training/jobs", "admin", {}),
]


def _counts(env: dict) -> tuple[int, ...]:
    with env["client"].app.state.engine.connect() as conn:
        return tuple(
            conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (StoredImage, Prediction, LabelEvent)
        )


@pytest.mark.parametrize(
    ("method", "path", "lowest", "kwargs"), ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES]
)
def test_role_boundaries(env: dict, method: str, path: str, lowest: str, kwargs: dict) -> None:
    client, url = env["client"], path.format(**env)
    before = _counts(env)
    r = client.request(method, url, **kwargs)
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
    r = client.request(method, url, headers={"X-API-Key": "mmi_wrong"}, **kwargs)
    assert r.status_code == 401
    for role in ROLES[: ROLES.index(lowest)]:
        r = client.request(method, url, headers={"X-API-Key": env["keys"][role]}, **kwargs)
        assert r.status_code == 403, (role, r.text)
        assert f"'{lowest}' or above" in r.json()["detail"]
    assert _counts(env) == before  # refused requests write nothing
    for role in ROLES[ROLES.index(lowest) :]:
        r = client.request(method, url, headers={"X-API-Key": env["keys"][role]}, **kwargs)
        assert r.status_code == 200, (role, r.status_code, r.text[:200])


@pytest.mark.parametrize(
    ("path", "lowest"), [("/", "inspector"), ("/dashboard", "manager"), ("/training", "admin")]
)
def test_pages_need_a_login_of_the_right_role(env: dict, path: str, lowest: str) -> None:
    client = env["client"]
    r = client.get(path, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/login?next={path}"
    for role in ROLES:
        r = client.get(path, headers={"X-API-Key": env["keys"][role]})
        want = 200 if ROLES.index(role) >= ROLES.index(lowest) else 403
        assert r.status_code == want, (role, path)


def test_open_routes(env: dict) -> None:
    client = env["client"]
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/login"):
        assert client.get(path).status_code == 200, path


def _login(client: TestClient, key: str, next_path: str = "/") -> TestClient:
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return client.post(
        "/login", data={"key": key, "csrf": csrf, "next": next_path}, follow_redirects=False
    )


def test_cookie_sessions_need_the_csrf_token(env: dict) -> None:
    settings = env["client"].app.state.settings
    with TestClient(create_app(settings)) as browser:
        r = _login(browser, env["keys"]["inspector"])
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        page = browser.get("/")
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
        label = f"/predictions/{env['pid']}/label"
        r = browser.put(label, json={"label": "good"})
        assert r.status_code == 403 and "CSRF" in r.json()["detail"]
        r = browser.put(label, json={"label": "good"}, headers={"X-CSRF-Token": "forged"})
        assert r.status_code == 403
        r = browser.put(label, json={"label": "good"}, headers={"X-CSRF-Token": token})
        assert r.status_code == 200 and r.json()["labelled_by"] == "test-inspector"
        r = browser.post("/predict", files=[("files", ("c.png", png_bytes(5), "image/png"))])
        assert r.status_code == 403  # a cookie alone cannot post images either
        assert browser.get("/dashboard").status_code == 403  # inspector, not manager
        r = browser.post("/logout", data={"csrf": token}, follow_redirects=False)
        assert r.status_code == 303
        assert browser.get("/", follow_redirects=False).status_code == 303


def _cookie_of(browser: TestClient) -> str:
    return browser.cookies.get("maxmin_session")


def test_logout_ends_the_session_for_every_copy_of_the_cookie(env: dict) -> None:
    settings = env["client"].app.state.settings
    with TestClient(create_app(settings)) as browser, TestClient(create_app(settings)) as thief:
        assert _login(browser, env["keys"]["inspector"]).status_code == 303
        thief.cookies.set("maxmin_session", _cookie_of(browser))  # saved before the logout
        assert thief.get("/predictions").status_code == 200
        token = re.search(r'name="csrf-token" content="([^"]+)"', browser.get("/").text).group(1)
        assert browser.post("/logout", data={"csrf": token}).status_code == 200  # to /login
        r = thief.get("/predictions")
        assert r.status_code == 401, r.text
        label = f"/predictions/{env['pid']}/label"
        r = thief.put(label, json={"label": "dent"}, headers={"X-CSRF-Token": token})
        assert r.status_code == 401
        assert thief.get("/", follow_redirects=False).status_code == 303  # to the login page


def test_an_admin_ends_every_session_of_a_key(
    env: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = env["client"].app.state.settings
    monkeypatch.setenv("DATABASE_URL", env["url"])
    assert main(["keys", "create", "--role", "manager", "--name", "tablet-2"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        for browser in (one, two):
            assert _login(browser, key).status_code == 303
            assert browser.get("/stats").status_code == 200
        assert main(["keys", "end-sessions", key[:12]]) == 0
        assert "Ended 2 browser session(s)" in capsys.readouterr().out
        assert one.get("/stats").status_code == 401 and two.get("/stats").status_code == 401
        assert env["client"].get("/stats", headers={"X-API-Key": key}).status_code == 200
        assert _login(one, key).status_code == 303  # the key itself still logs in
        assert one.get("/stats").status_code == 200
    assert main(["keys", "end-sessions", "nokey"]) == 2


def test_login_rejects_bad_keys_and_foreign_redirects(env: dict) -> None:
    settings = env["client"].app.state.settings
    with TestClient(create_app(settings)) as browser:
        r = _login(browser, "mmi_nope")
        assert r.status_code == 401 and "unknown or revoked" in r.text
        r = _login(browser, env["keys"]["manager"], next_path="//evil.example/steal")
        assert r.headers["location"] == "/"
        r = browser.post("/login", data={"key": env["keys"]["manager"], "csrf": "x"})
        assert r.status_code == 403


def test_keys_are_stored_hashed_and_revocable(
    env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with env["client"].app.state.sessions() as session:
        stored = {row.key_sha256 for row in session.execute(select(ApiKey)).scalars()}
    assert not any(k in stored for k in env["keys"].values())
    monkeypatch.setenv("DATABASE_URL", env["url"])
    assert main(["keys", "create", "--role", "line", "--name", "line-9"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("mmi_")
    client = env["client"]
    ok = client.get("/healthz", headers={"X-API-Key": key})
    assert ok.status_code == 200
    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "line-9" in listing and key not in listing
    assert main(["keys", "revoke", key[:12]]) == 0
    r = client.post(
        "/predict",
        headers={"X-API-Key": key},
        files=[("files", ("d.png", png_bytes(6), "image/png"))],
    )
    assert r.status_code == 401
    with pytest.raises(SystemExit):  # argparse refuses an unknown role
        main(["keys", "create", "--role", "root", "--name", "x"])


def test_first_start_creates_and_prints_an_admin_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import _first_admin_key

    url = f"sqlite:///{tmp_path / 'first.db'}"
    upgrade(url)
    settings = Settings(data_dir=tmp_path, database_url=url)
    _first_admin_key(settings)
    out = capsys.readouterr().out
    assert "created an admin key" in out and "mmi_" in out
    _first_admin_key(settings)
    assert capsys.readouterr().out == ""  # only once


def test_workers_share_one_session_secret(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from app.core.security import session_secret

    with ThreadPoolExecutor(8) as pool:
        secrets_seen = set(pool.map(lambda _: session_secret(tmp_path, None), range(16)))
    assert len(secrets_seen) == 1 and len(secrets_seen.pop()) > 40
    assert (tmp_path / "session.key").stat().st_mode & 0o777 == 0o600
    assert session_secret(tmp_path, "configured") == "configured"
