"""Schemathesis against the service's own OpenAPI schema: no operation answers 5xx.

Generated requests (valid and invalid parameters, bodies, multipart parts) go to a real server
process with real models and a real database.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.helpers import server  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, trained_run: Path) -> Iterator[object]:
    root = tmp_path_factory.mktemp("fuzz")
    run_dir = trained_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"sqlite:///{root / 'var' / 'maxmin.db'}"
    with server(url, run_dir, Path(root / "var"), port) as (key, _):
        yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json"), key


@pytest.mark.slow
def test_no_operation_answers_5xx(api_schema) -> None:  # noqa: ANN001
    """Every operation, about 30 generated requests each, with an admin key."""
    from hypothesis import given

    api_schema, key = api_schema
    checked = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )  # the same cases on every run: CI never flakes
        def run(case) -> None:  # noqa: ANN001
            response = case.call(timeout=30, headers={"X-API-Key": key})
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:300]}"
            )

        run()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert {"POST /predict", "PUT /predictions/{prediction_id}/label", "GET /stats"} <= set(checked)
