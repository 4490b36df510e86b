"""Odd requests get the client's status, never a 500: a client that goes away mid-upload, and any
text at all in every field that reaches the database, on both databases."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import free_port, png_bytes, server

# Text as HTTP can carry it: form fields and query strings are UTF-8, so no lone surrogates;
# JSON bodies may carry those too (as escapes).
FORM_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
JSON_TEXT = st.text(max_size=60)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(filename=FORM_TEXT, source=FORM_TEXT, part_id=FORM_TEXT, who=JSON_TEXT, query=FORM_TEXT)
def test_any_text_in_any_field_is_stored_or_refused_never_a_500(
    client_for_text,  # noqa: ANN001
    filename: str,
    source: str,
    part_id: str,
    who: str,
    query: str,
) -> None:
    client = client_for_text
    r = client.post(
        "/predict",
        files=[("files", (filename or "x.png", png_bytes(1), "image/png"))],
        data={"source": source, "part_id": part_id},
    )
    assert r.status_code in (200, 422), (r.status_code, r.text)
    if r.status_code == 200:
        made = r.json()["data"][0]
        # Stored as sent, less surrounding white space; nothing left means not given.
        assert made["source"] == (source.strip() or None)
        assert made["part_id"] == (part_id.strip() or None)
        r = client.put(
            f"/predictions/{made['id']}/label", json={"label": "good", "labelled_by": who}
        )
        assert r.status_code in (200, 422), (r.status_code, r.text)
        if r.status_code == 200:
            got = client.get(f"/predictions/{made['id']}").json()
            assert got["labelled_by"] == (who or "test-admin")  # unnamed: the key's owner
    for field in ("source", "predicted"):
        r = client.get("/predictions", params={field: query})
        assert r.status_code in (200, 422), (field, r.status_code, r.text)


@pytest.fixture
def client_for_text(service_client, trained_run: Path, db_url: str):  # noqa: ANN001, ANN201
    with service_client(trained_run, db_url=db_url) as client:
        yield client


def test_a_client_that_disconnects_mid_upload_is_a_499_not_an_error(
    trained_run: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"sqlite:///{tmp_path / 'maxmin.db'}"
    with server(url, trained_run, tmp_path / "var", port) as (key, _):
        boundary = "b0undary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                (
                    f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n"
                    f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                    f"Content-Length: 100000\r\n\r\n"
                ).encode()
                + head
                + png_bytes(1)[:50]
            )
        base, headers = f"http://127.0.0.1:{port}", {"X-API-Key": key}
        for _ in range(50):  # the server notices the closed connection on its next read
            text = httpx.get(f"{base}/metrics", headers=headers, timeout=10).text
            if 'route="/predict",status="499"' in text:
                break
            time.sleep(0.1)
        assert 'maxmin_http_requests_total{method="POST",route="/predict",status="499"} 1.0' in (
            text
        ), text
        assert 'status="500"' not in text
        r = httpx.post(
            f"{base}/predict",
            files=[("files", ("b.png", png_bytes(2), "image/png"))],
            headers=headers,
            timeout=30,
        )
        assert r.status_code == 200  # and the service goes on
