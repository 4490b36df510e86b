"""Deployment files: what can be checked without a Docker engine."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
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
    # The training page writes runs and reads datasets.
    assert "./runs:/runs" in app["volumes"] and "./datasets:/datasets:ro" in app["volumes"]
    assert app["environment"]["MAXMIN_DATASETS_DIR"] == "/datasets"


def test_dockerfile_runs_as_non_root_with_the_tested_start_up() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "USER maxmin" in text and "HEALTHCHECK" in text and "/healthz" in text
    # The browser test starts the service the same way: `maxmin-inspect serve`, which migrates.
    assert "maxmin-inspect serve --host 0.0.0.0" in text
    assert '"maxmin_inspect", "serve"' in (ROOT / "tests" / "test_browser.py").read_text()
    # Every package the project installs, and the migrations, are in the image.
    import tomllib

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in found["packages"]["find"]["include"]]
    assert {"models", "inspectlib", "training", "app", "maxmin_inspect"} <= set(packages)
    for path in [*packages, "migrations"]:
        assert f"COPY {path} ./{path}" in text, path
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk <= set(packages), on_disk - set(packages)  # no package left out of the wheel


def _compose() -> list[str] | None:
    """The Compose command on this machine: the docker plugin, else the standalone tool."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _compose_runner() -> tuple[list[str], partial]:
    """The Compose command and a runner for it in the checkout (the database password set), or a
    skip, or a failure where CI requires the tool."""
    cmd = _compose()
    if cmd is None:
        if os.environ.get("MAXMIN_REQUIRE_COMPOSE") == "1":
            pytest.fail("no Compose tool found but MAXMIN_REQUIRE_COMPOSE=1")
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {**os.environ, "POSTGRES_PASSWORD": "test-only"}
    return cmd, partial(
        subprocess.run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_compose_config_validates() -> None:
    """`docker compose config` accepts the file (needs no engine) and resolves both services."""
    cmd, run = _compose_runner()
    checked = run([*cmd, "-f", "docker-compose.yml", "config", "-q"])
    assert checked.returncode == 0, checked.stderr
    services = run([*cmd, "-f", "docker-compose.yml", "config", "--services"])
    assert services.returncode == 0, services.stderr
    assert {"app", "db"} <= set(services.stdout.split())
    resolved = yaml.safe_load(run([*cmd, "-f", "docker-compose.yml", "config"]).stdout)
    assert "test-only@db:5432" in resolved["services"]["app"]["environment"]["DATABASE_URL"]


def test_compose_scale_profile_runs_stateless_replicas() -> None:
    """The "scale" profile: two replicas behind a proxy, images in MinIO, the rest in PostgreSQL,
    the schema migrated once before any replica starts."""
    cmd, run = _compose_runner()
    base = [*cmd, "-f", "docker-compose.yml", "--profile", "scale", "config"]
    services = run([*base, "--services"])
    assert services.returncode == 0, services.stderr
    assert {"db", "minio", "buckets", "migrate", "replica", "proxy"} <= set(services.stdout.split())
    resolved = yaml.safe_load(run(base).stdout)["services"]
    replica, migrate = resolved["replica"], resolved["migrate"]
    assert replica["environment"] == migrate["environment"]
    store = replica["environment"]["MAXMIN_IMAGE_STORE"]
    assert store.startswith("s3://maxmin-images")
    assert replica["environment"]["MAXMIN_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "test-only@db:5432" in replica["environment"]["DATABASE_URL"]
    assert replica["environment"]["MAXMIN_SESSION_SECRET"]
    assert replica["deploy"]["replicas"] == 2
    assert replica["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert replica["depends_on"]["buckets"]["condition"] == "service_completed_successfully"
    assert migrate["command"] == ["maxmin-inspect", "db", "upgrade"]
    # No image volume on a replica: what one stores, the others read from the bucket.
    assert not any(str(v).startswith("images") for v in replica.get("volumes", []))
    bucket = store[len("s3://") :].split("/")[0]
    assert bucket in " ".join(resolved["buckets"]["command"])
    conf = (ROOT / "docker" / "nginx.conf").read_text()
    assert "server replica:8000" in conf and "proxy_pass http://maxmin" in conf
    assert "client_max_body_size 64m" in conf  # the service's own default MAXMIN_MAX_BODY_BYTES
