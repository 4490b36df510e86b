"""The models on a real Open Inference Protocol server: MLServer, installed from PyPI in a venv of
its own (`make test` makes it), serving the Triton repository `maxmin-inspect export` wrote, on
loopback. The service sends it its batches (MAXMIN_INFERENCE_URL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, png_bytes

REPO = Path(__file__).resolve().parents[1]
OIP_PYTHON = Path(os.environ.get("MAXMIN_OIP_PYTHON", REPO / ".venv-oip" / "bin" / "python"))
NAMES = ["baseline", "maxmin"]


def _start(folder: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [str(OIP_PYTHON), "-m", "mlserver.cli.main", "start", str(folder)],
        cwd=Path(__file__).parent / "oip",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent / "oip")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def oip_server(compressed_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    if not OIP_PYTHON.is_file():
        if os.environ.get("MAXMIN_REQUIRE_OIP") == "1":
            pytest.fail(f"MLServer's Python not found at {OIP_PYTHON} (MAXMIN_REQUIRE_OIP=1)")
        pytest.skip(f"MLServer's Python not found at {OIP_PYTHON}: `make test` installs it")
    root = tmp_path_factory.mktemp("oip")
    repo = root / "triton"
    subprocess.run(
        [sys.executable, "-m", "maxmin_inspect", "export", str(compressed_run), "--triton"]
        + [str(repo), "--form", "int8"],
        check=True,
        capture_output=True,
    )
    folder = root / "mlserver"
    port = free_port()
    for name in NAMES:
        (folder / name).mkdir(parents=True)
        settings = {
            "name": name,
            "implementation": "onnx_model.OnnxModel",
            "parameters": {"uri": str(repo / name / "1" / "model.onnx")},
        }
        (folder / name / "model-settings.json").write_text(json.dumps(settings))
    server_settings = {
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,
        "host": "127.0.0.1",
    }
    (folder / "settings.json").write_text(json.dumps(server_settings))
    proc = _start(folder, port)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if all(
                httpx.get(f"{url}/v2/models/{n}/ready", timeout=1).status_code == 200 for n in NAMES
            ):
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("MLServer did not start")
        time.sleep(0.5)
    server = {"url": url, "proc": proc, "folder": folder, "port": port}
    yield server
    server["proc"].kill()
    server["proc"].wait()


def test_service_classifies_on_the_server(compressed_run: Path, oip_server, service_client) -> None:
    image = png_bytes(5)
    with service_client(compressed_run, runtime="onnxruntime", model_form="int8") as local:
        expected = local.post("/predict", content=image, headers={"Content-Type": "image/png"})
    with service_client(
        compressed_run, inference_url=oip_server["url"], model_form="int8"
    ) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ok" and ready["form"] == "inference server int8"
        r = client.post("/predict", content=image, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        got = r.json()["data"][0]["results"]
        want = expected.json()["data"][0]["results"]
        for name in NAMES:
            assert got[name]["model_version"] == want[name]["model_version"]
            assert got[name]["model_version"].startswith(f"{name}.int8.onnx:")
            for label, p in want[name]["probabilities"].items():
                assert got[name]["probabilities"][label] == pytest.approx(p, abs=1e-5)
        # Several images in one request go to the server as one batch per model.
        many = [("files", (f"{i}.png", png_bytes(i), "image/png")) for i in range(5)]
        assert client.post("/predict", files=many).json()["count"] == 5

        # The server goes down: the same 503 and readiness reason as a dead model process.
        oip_server["proc"].kill()
        oip_server["proc"].wait()
        r = client.post("/predict", content=image, headers={"Content-Type": "image/png"})
        assert r.status_code == 503 and "inference server" in r.json()["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.json()["detail"]
        # Back up: served again, nothing restarted on this side.
        oip_server["proc"] = _start(oip_server["folder"], oip_server["port"])
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready again after the server came back"
            time.sleep(0.5)
        r = client.post("/predict", content=image, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text


def test_server_down_at_start(compressed_run: Path, service_client) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with service_client(compressed_run, inference_url=url, model_form="int8") as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "unreachable" in r.json()["detail"]
        r = client.post("/predict", content=png_bytes(1), headers={"Content-Type": "image/png"})
        assert r.status_code == 503
