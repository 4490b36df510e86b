"""Deployment files: what can be checked without a Docker engine."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_wires_the_service_to_postgres() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    app, db = compose["services"]["app"], compose["services"]["db"]
    assert app["build"]["dockerfile"] == "docker/Dockerfile"
    assert (ROOT / app["build"]["dockerfile"]).is_file()
    assert app["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@db:5432/" in app["environment"]["DATABASE_URL"]
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert "healthcheck" in db and db["volumes"][0].startswith("pgdata:")
    assert {"pgdata", "images"} <= set(compose["volumes"])
    assert any(v.startswith("images:") for v in app["volumes"])


def test_dockerfile_runs_as_non_root_with_the_tested_start_up() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "USER maxmin" in text and "HEALTHCHECK" in text and "/healthz" in text
    # The browser test starts the service the same way: `maxmin-inspect serve`, which migrates.
    assert "maxmin-inspect serve --host 0.0.0.0" in text
    assert "training.cli" in (ROOT / "tests" / "test_browser.py").read_text()
    for path in ("models", "training", "app", "migrations", "pyproject.toml"):
        assert f"COPY {path}" in text
