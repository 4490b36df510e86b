"""One model process for all web workers: same answers, batches merged across workers, a bad
batch fails alone, a stranger is refused, and a dead host is replaced."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.core.inference import Classifier
from app.core.model_host import ModelHost, ModelHostClient
from app.core.model_process import ModelProcessFailed, ModelsToLoad
from tests.helpers import png_bytes

NAMES = ("baseline", "maxmin")


@pytest.fixture(scope="module")
def run_dir(trained_run: Path) -> Path:
    return trained_run


@pytest.fixture(scope="module")
def local(run_dir: Path) -> Classifier:
    return Classifier(run_dir, NAMES, "cpu")


@pytest.fixture
def host(run_dir: Path):  # noqa: ANN201
    h = ModelHost(ModelsToLoad(run_dir, NAMES, "cpu"))
    yield h
    h.close()


def _images(local: Classifier, start: int, n: int) -> np.ndarray:
    return np.stack([local.decode(png_bytes(i), 10**7).array for i in range(start, start + n)])


def test_workers_get_the_in_process_answers(host: ModelHost, local: Classifier) -> None:
    a = ModelHostClient(host.address, host.authkey)
    b = ModelHostClient(host.address, host.authkey)
    assert a.device == "cpu" and a.run_dir == local.run_dir.resolve()
    for client, start in ((a, 0), (b, 5), (a, 10)):
        images = _images(local, start, 4)
        got = client.classify(images)
        for name, (probs, _) in local.classify(images).items():
            np.testing.assert_allclose(got[name][0], probs, atol=1e-6)
            assert got[name][0].shape == probs.shape and got[name][1] >= 0
    with pytest.raises(ModelProcessFailed, match="ValueError|RuntimeError"):
        b.classify(np.zeros((1, 3, 5, 5), dtype=np.uint8))  # a bad batch: an error...
    assert b.classify(_images(local, 0, 2))["maxmin"][0].shape == (2, len(local.classes))
    assert a.info()["requests"] == 5  # ...and the host lives on
    a.close()
    b.close()


def test_waiting_batches_from_several_workers_share_one_pass(
    host: ModelHost, local: Classifier
) -> None:
    """While one worker's large batch runs, two others arrive; both go through in one pass."""
    big = np.repeat(_images(local, 0, 8), 250, axis=0)  # long enough to be still running
    small = [_images(local, 20, 3), _images(local, 30, 2)]
    clients = [ModelHostClient(host.address, host.authkey) for _ in range(3)]
    results: dict[int, dict] = {}

    def call(k: int, arrays: np.ndarray) -> None:
        results[k] = clients[k].classify(arrays)

    first = threading.Thread(target=call, args=(0, big))
    first.start()
    time.sleep(0.3)  # the big batch is in the host's hands
    others = [threading.Thread(target=call, args=(k + 1, a)) for k, a in enumerate(small)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(120)
    info = clients[0].info()
    assert info["requests"] == 3
    assert info["passes"] == 2, info  # the big one, then the two small ones together
    for k, arrays in enumerate(small):
        want = local.classify(arrays)
        for name in NAMES:
            np.testing.assert_allclose(results[k + 1][name][0], want[name][0], atol=1e-6)
    assert results[0]["baseline"][0].shape[0] == len(big)
    for c in clients:
        c.close()


def test_a_client_without_the_key_is_refused(host: ModelHost, local: Classifier) -> None:
    with pytest.raises(ModelProcessFailed, match="not answering"):
        ModelHostClient(host.address, os.urandom(32))
    client = ModelHostClient(host.address, host.authkey)  # the host still serves its workers
    assert client.classify(_images(local, 0, 1))["baseline"][0].shape[0] == 1
    client.close()


def test_a_dead_host_is_replaced(host: ModelHost, local: Classifier) -> None:
    client = ModelHostClient(host.address, host.authkey)
    idle = ModelHostClient(host.address, host.authkey)  # connected, then idle across the restart
    images = _images(local, 0, 2)
    client.classify(images)
    idle.classify(images)
    old = host.pid
    os.kill(old, signal.SIGKILL)
    with pytest.raises(ModelProcessFailed):  # the batch the dead host would have held
        client.classify(images)
    deadline = time.monotonic() + 120
    while True:
        try:
            got = client.classify(images)
            break
        except ModelProcessFailed:
            assert time.monotonic() < deadline, "no new host"
            time.sleep(0.2)
    assert host.pid != old
    np.testing.assert_allclose(got["maxmin"][0], local.classify(images)["maxmin"][0], atol=1e-6)
    # A worker whose connection went stale while idle gets its next batch answered, not a 503.
    assert idle.classify(images)["baseline"][0].shape[0] == 2
    client.close()
    idle.close()


def test_closing_removes_the_socket(run_dir: Path) -> None:
    h = ModelHost(ModelsToLoad(run_dir, NAMES, "cpu"))
    pid, address = h.pid, h.address
    assert Path(address).exists()
    client = ModelHostClient(address, h.authkey)
    assert client.ping() is None
    h.close()
    assert "not reachable" in client.ping()
    assert not Path(address).parent.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_host_on_cuda_answers_as_the_models_in_process(run_dir: Path, device) -> None:  # noqa: ANN001
    """The shared model process with its own CUDA context: same answers as CUDA in-process."""
    if device.type != "cuda":
        pytest.skip("needs CUDA (MAXMIN_TEST_DEVICE=cuda on a GPU machine)")
    gpu = Classifier(run_dir, NAMES, "cuda")
    h = ModelHost(ModelsToLoad(run_dir, NAMES, "cuda"))
    try:
        client = ModelHostClient(h.address, h.authkey)
        assert client.device.startswith("cuda")
        images = _images(gpu, 0, 6)
        got, want = client.classify(images), gpu.classify(images)
        for name in NAMES:
            np.testing.assert_allclose(got[name][0], want[name][0], atol=1e-5)
        client.close()
    finally:
        h.close()


def test_a_worker_that_starts_while_the_shared_process_is_down_serves_once_it_is_back(
    host: ModelHost,
    run_dir: Path,
    service_client,  # noqa: ANN001
) -> None:
    """A worker whose models could not load because the shared model process was being restarted
    says so in /readyz and loads them within moments of its return (not only at the next reload
    check, a minute here), also with the run pinned."""
    host._stopping.set()  # no automatic restart: the test brings it back itself
    victim = host._child.proc
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    shared = {"model_host": host.address, "model_host_key": host.authkey.hex()}
    with service_client(run_dir, reload_seconds=60, **shared) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert "shared model process is not answering" in r.json()["detail"], r.text
        assert r.headers["Retry-After"] == "1"  # passing: retry in a moment
        predict = client.post("/predict", files=[("files", ("a.png", png_bytes(1), "image/png"))])
        assert predict.status_code == 503 and predict.headers["Retry-After"] == "1"
        host._stopping.clear()
        host._child.start()  # as the serve command's watchdog does
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.1)
        r = client.post("/predict", files=[("files", ("a.png", png_bytes(1), "image/png"))])
        assert r.status_code == 200, r.text
