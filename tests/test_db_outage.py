"""PostgreSQL going away while the service runs: 503 with a clear detail, then recovery by itself.

The service reaches the real server through a small TCP relay that the test can cut and restore,
so the outage is a real one (connections refused and reset), not a mocked exception.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from app.core.config import Settings
from app.core.db import upgrade
from app.main import create_app
from tests.helpers import make_key, png_bytes, postgres_database


class Relay:
    """Forwards a local port to the database server; ``cut`` refuses and resets connections."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.conns: list[socket.socket] = []
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            server = socket.create_connection(self.target)
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        self.up.clear()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        self.conns.clear()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.mark.slow
def test_postgres_outage_gives_503_then_recovers(tmp_path: Path, trained_run: Path) -> None:
    run_dir = trained_run
    with postgres_database() as url:
        upgrade(url)
        real = make_url(url)
        relay = Relay((real.host or "127.0.0.1", real.port or 5432))
        via_relay = real.set(host="127.0.0.1", port=relay.port).render_as_string(
            hide_password=False
        )
        settings = Settings(
            data_dir=tmp_path / "var", database_url=via_relay, run_dir=run_dir, device="cpu"
        )
        try:
            key = make_key(url)
            with TestClient(create_app(settings), headers={"X-API-Key": key}) as client:
                first = client.post(
                    "/predict", files=[("files", ("a.png", png_bytes(1), "image/png"))]
                )
                assert first.status_code == 200
                pid = first.json()["data"][0]["id"]

                relay.cut()
                down = client.post(
                    "/predict", files=[("files", ("b.png", png_bytes(2), "image/png"))]
                )
                assert down.status_code == 503
                assert "database unavailable" in down.json()["detail"]
                assert (
                    client.put(f"/predictions/{pid}/label", json={"label": "dent"}).status_code
                    == 503
                )
                ready = client.get("/readyz")
                assert ready.status_code == 503 and "database" in ready.json()["detail"]
                assert client.get("/healthz").status_code == 200  # alive, just not ready
                # The refused upload left no file behind.
                assert not client.app.state.store.exists(hashlib.sha256(png_bytes(2)).hexdigest())

                relay.restore()
                assert client.get("/readyz").status_code == 200
                again = client.post(
                    "/predict", files=[("files", ("b.png", png_bytes(2), "image/png"))]
                )
                assert again.status_code == 200
                assert (
                    client.put(f"/predictions/{pid}/label", json={"label": "dent"}).status_code
                    == 200
                )
                assert client.get("/predictions").json()["count"] == 2
        finally:
            relay.close()
