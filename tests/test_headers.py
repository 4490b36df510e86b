"""Security headers on every response, a nonce for the one inline script, /docs without a CDN,
stored images with their real type, and /readyz details only for managers and above."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import make_key, png_bytes


def test_every_page_has_the_policy_and_its_inline_script_the_nonce(
    service_client,  # noqa: ANN001
    trained_run: Path,
) -> None:
    with service_client(trained_run, role="inspector") as client:
        for path in ("/", "/login", "/healthz", "/static/inspector.js", "/nowhere"):
            r = client.get(path)
            assert r.headers["x-content-type-options"] == "nosniff", path
            assert r.headers["referrer-policy"] == "same-origin", path
            csp = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp, path
            assert "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0], path
        page = client.get("/")
        nonce = re.search(r"'nonce-([^']+)'", page.headers["content-security-policy"]).group(1)
        scripts = re.findall(r"<script([^>]*)>", page.text)
        inline = [s for s in scripts if "src=" not in s]
        assert inline and all(f'nonce="{nonce}"' in s for s in inline)
        again = client.get("/").headers["content-security-policy"]
        assert nonce not in again  # a fresh nonce per response


def test_docs_come_from_local_files_or_not_at_all(service_client, trained_run: Path) -> None:  # noqa: ANN001
    with service_client(trained_run) as client:
        docs = client.get("/docs")
        assert docs.status_code == 200
        sources = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
        assert sources and all(s.startswith("/") for s in sources), sources
        assert client.get("/docs-static/swagger-ui-bundle.js").status_code == 200
        nonce = re.search(r"'nonce-([^']+)'", docs.headers["content-security-policy"]).group(1)
        assert f'<script nonce="{nonce}">' in docs.text
    with service_client(trained_run, api_docs=False) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 200  # the schema stays for clients


def test_readiness_details_are_for_managers(service_client, trained_run: Path, tmp_path) -> None:  # noqa: ANN001
    url = f"sqlite:///{tmp_path / 'ready.db'}"
    with service_client(trained_run, db_url=url, role="manager") as client:
        full = client.get("/readyz")
        assert full.status_code == 200 and full.json()["run"] == str(trained_run)
        assert set(full.json()["models"]) == {"baseline", "maxmin"}
        for headers in ({"X-API-Key": "not-a-key"}, {"X-API-Key": make_key(url, "line")}):
            brief = client.get("/readyz", headers=headers)
            assert brief.status_code == 200 and brief.json() == {"status": "ok"}


def test_stored_images_keep_their_type_and_are_not_sniffed(service_client, trained_run) -> None:  # noqa: ANN001
    with service_client(trained_run, role="inspector") as client:
        r = client.post(
            "/predict", files=[("files", ("a.bin", png_bytes(4), "application/octet-stream"))]
        )
        assert r.status_code == 200, r.text
        sha = r.json()["data"][0]["image_sha256"]
        image = client.get(f"/images/{sha}")
        assert image.headers["content-type"] == "image/png"
        assert image.headers["x-content-type-options"] == "nosniff"
