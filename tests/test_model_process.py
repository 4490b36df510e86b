"""The models in their own process: same answers as in-process, and a dead process is replaced."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from app.core.inference import Classifier
from app.core.model_process import ModelProcess, ModelProcessFailed, ModelsToLoad
from tests.helpers import png_bytes, predict_across_a_kill

AB = ("baseline", "maxmin")


@pytest.fixture(scope="module")
def run_dir(trained_run: Path) -> Path:
    return trained_run


def test_answers_equal_the_in_process_models(run_dir: Path) -> None:
    local = Classifier(run_dir, ["baseline", "maxmin"], "cpu")
    images = np.stack([local.decode(png_bytes(i), 10**7).array for i in range(5)])
    proc = ModelProcess(ModelsToLoad(run_dir, AB, "cpu"))
    try:
        remote = proc.classify(images)
        for name, (probs, _) in local.classify(images).items():
            np.testing.assert_allclose(remote[name][0], probs, atol=1e-6)
        with pytest.raises(ModelProcessFailed, match="ValueError|RuntimeError"):
            proc.classify(np.zeros((1, 3, 5, 5), dtype=np.uint8))  # a bad batch: an error...
        assert proc.classify(images)["maxmin"][0].shape == (5, len(local.classes))  # ...not a death
    finally:
        proc.close()
    assert proc.pid is None


def test_models_side_by_side_answer_as_one_after_the_other(run_dir: Path) -> None:
    """MAXMIN_PARALLEL_MODELS: on the CPU the A/B models run a thread each, with the same
    answers; in the model process too, and a bad batch is still an error, not a death."""
    names = AB
    serial = Classifier(run_dir, names, "cpu", parallel="false")
    side_by_side = Classifier(run_dir, names, "cpu", parallel="auto")
    assert not serial.parallel and side_by_side.parallel
    assert not Classifier(run_dir, ["maxmin"], "cpu", parallel="true").parallel  # one model
    images = np.stack([serial.decode(png_bytes(i), 10**7).array for i in range(9)])
    want = serial.classify(images)
    for _ in range(3):
        got = side_by_side.classify(images)
        assert tuple(got) == names
        for name in names:
            # One thread per model instead of two splits some kernels' loops differently (batch
            # normalization's vectorized body and scalar tail), which may move the last bit.
            np.testing.assert_allclose(got[name][0], want[name][0], rtol=1e-6, atol=1e-7)
            assert (got[name][0].argmax(1) == want[name][0].argmax(1)).all()
            assert got[name][1] > 0
    proc = ModelProcess(ModelsToLoad(run_dir, names, "cpu", parallel="true"))
    try:
        remote = proc.classify(images)
        for name in names:
            np.testing.assert_allclose(remote[name][0], want[name][0], atol=1e-6)
        with pytest.raises(ModelProcessFailed, match="ValueError|RuntimeError"):
            proc.classify(np.zeros((1, 3, 5, 5), dtype=np.uint8))
        assert proc.classify(images)["baseline"][0].shape == (9, len(serial.classes))
    finally:
        proc.close()


def test_the_gpu_path_answers_as_the_cpu(run_dir: Path, device) -> None:  # noqa: ANN001
    """On CUDA the models are queued together and waited for once; same answers as the CPU's."""
    if device.type != "cuda":
        pytest.skip("needs CUDA (MAXMIN_TEST_DEVICE=cuda on a GPU machine)")
    names = AB
    cpu = Classifier(run_dir, names, "cpu")
    gpu = Classifier(run_dir, names, "cuda")
    images = np.stack([cpu.decode(png_bytes(i), 10**7).array for i in range(7)])
    want = cpu.classify(images)
    got = gpu.classify(images)
    for name in names:
        probs, ms = got[name]
        assert probs.shape == want[name][0].shape
        np.testing.assert_allclose(probs, want[name][0], atol=5e-3)  # cuDNN may use TF32
        assert 0 < ms < 1000
    proc = ModelProcess(ModelsToLoad(run_dir, names, "cuda"))
    try:
        assert proc.device.startswith("cuda")
        remote = proc.classify(images)
        for name in names:
            np.testing.assert_allclose(remote[name][0], got[name][0], atol=1e-5)
    finally:
        proc.close()


def test_a_run_that_cannot_load_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelProcessFailed, match="report.json"):
        ModelProcess(ModelsToLoad(tmp_path, ("baseline",), "cpu"))


def test_killed_model_process_gives_503_then_serves_again(run_dir: Path, service_client) -> None:  # noqa: ANN001
    upload = [("files", ("a.png", png_bytes(3), "image/png"))]
    with service_client(run_dir) as client:
        runner = client.app.state.models.runner
        assert isinstance(runner, ModelProcess) and runner.pid != os.getpid()
        assert client.post("/predict", files=upload).status_code == 200
        first = runner.pid
        r = predict_across_a_kill(client, first, "model process stopped")
        if r.status_code == 503:
            r = client.post("/predict", files=upload)
            assert r.status_code == 200, r.text
        assert runner.pid not in (None, first)
        rows = client.get("/predictions").json()["count"]
        assert rows == 2


def test_a_dead_model_process_is_replaced_before_the_next_request(
    run_dir: Path,
    service_client,  # noqa: ANN001
) -> None:
    """/readyz names the dead process until the watchdog's new one is up; no request needed."""
    with service_client(run_dir) as client:
        runner = client.app.state.models.runner
        assert client.get("/readyz").status_code == 200
        first = runner.pid
        os.kill(first, signal.SIGKILL)
        seen, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline:
            r = client.get("/readyz")
            if r.status_code == 503:
                seen.append(r.json()["detail"])
                break
            time.sleep(0.01)
        assert seen and "model process exited (code -9)" in seen[0], seen
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/readyz").status_code == 200
        assert runner.pid not in (None, first)  # replaced without a request
        upload = [("files", ("a.png", png_bytes(4), "image/png"))]
        assert client.post("/predict", files=upload).status_code == 200
        text = client.get("/metrics").text
        assert 'maxmin_model_process_restarts_total{process="worker"} 1.0' in text, text
    assert runner.ping() == "the model process is shut down"


def test_death_in_flight_fails_that_batch_and_the_next_one_restarts(run_dir: Path) -> None:
    proc = ModelProcess(ModelsToLoad(run_dir, AB, "cpu"))
    try:
        local = Classifier(run_dir, ["baseline"], "cpu")
        big = np.repeat(local.decode(png_bytes(1), 10**7).array[None], 50_000, axis=0)
        victim = proc.pid
        pool = ThreadPoolExecutor(1)
        future = pool.submit(proc.classify, big)  # seconds of work for the child
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(ModelProcessFailed, match="stopped"):
            future.result(timeout=60)
        pool.shutdown()
        assert proc.classify(big[:3])["baseline"][0].shape[0] == 3
        assert proc.pid not in (None, victim)
    finally:
        proc.close()


def test_a_batch_that_takes_too_long_is_abandoned_not_waited_for(run_dir: Path) -> None:
    proc = ModelProcess(ModelsToLoad(run_dir, AB, "cpu"), batch_timeout_s=0.5)
    try:
        local = Classifier(run_dir, ["baseline"], "cpu")
        one = local.decode(png_bytes(2), 10**7).array[None]
        slow = np.repeat(one, 50_000, axis=0)  # seconds of work: far over the limit
        stuck = proc.pid
        # Only the deadline says "did not answer": the batch was abandoned, not waited for.
        with pytest.raises(ModelProcessFailed, match="did not answer within 0.5 s"):
            proc.classify(slow)
        assert proc.classify(one)["maxmin"][0].shape[0] == 1  # a fresh process answers
        assert proc.pid not in (None, stuck)
    finally:
        proc.close()
