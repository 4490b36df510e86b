"""Micro-batching: batched answers equal single ones, requests share batches, bounded queue."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from app.core.batcher import MicroBatcher, Overloaded
from app.core.inference import Classifier
from tests.helpers import png_bytes


@pytest.fixture(scope="module")
def classifier(trained_run: Path) -> Classifier:
    run_dir = trained_run
    return Classifier(run_dir, ["baseline", "maxmin"], "cpu")


def _images(classifier: Classifier, n: int, seed: int = 0) -> list[np.ndarray]:
    return [
        classifier.decode(png_bytes(seed + i, brightness=50 + 30 * i), 10**7).array[None]
        for i in range(n)
    ]


def test_batched_answers_equal_single_calls(classifier: Classifier) -> None:
    batcher = MicroBatcher(classifier, max_batch=64, max_wait_ms=200)
    try:
        images = _images(classifier, 6)
        futures = [batcher.submit(img) for img in images]
        results = [f.result(timeout=30) for f in futures]
    finally:
        batcher.close()
    assert max(r.batch_size for r in results) > 1  # they shared a pass through the models
    for img, res in zip(images, results, strict=True):
        alone = classifier.classify(img)
        for name, (probs, _) in alone.items():
            np.testing.assert_allclose(res.outputs[name][0], probs, atol=1e-5)
            assert res.outputs[name][0].shape == (1, len(classifier.classes))


class _Gated:
    """The real classifier, held at a gate so that the queue fills up."""

    def __init__(self, inner: Classifier) -> None:
        self.inner, self.gate, self.entered = inner, threading.Event(), threading.Event()

    def classify(self, arrays: np.ndarray):  # noqa: ANN201
        self.entered.set()
        self.gate.wait(30)
        return self.inner.classify(arrays)


def test_full_queue_refuses_at_once(classifier: Classifier) -> None:
    gated = _Gated(classifier)
    batcher = MicroBatcher(gated, max_batch=1, max_wait_ms=0, max_queue=2)  # type: ignore[arg-type]
    img = _images(classifier, 1)[0]
    try:
        first = batcher.submit(img)
        assert gated.entered.wait(10)  # the worker is busy with the first image
        queued = [batcher.submit(img), batcher.submit(img)]
        with pytest.raises(Overloaded):
            batcher.submit(img)
        gated.gate.set()
        for f in [first, *queued]:
            assert f.result(timeout=30).batch_size == 1
    finally:
        gated.gate.set()
        batcher.close()


def test_model_failure_reaches_every_waiting_request(classifier: Classifier) -> None:
    batcher = MicroBatcher(classifier, max_batch=8, max_wait_ms=100)
    try:
        bad = np.zeros((1, 3, 5, 5), dtype=np.uint8)  # wrong shape for these models
        good = _images(classifier, 1)[0]
        f_bad, f_good = batcher.submit(bad), batcher.submit(good)
        with pytest.raises((ValueError, RuntimeError)):
            f_bad.result(timeout=30)
        # The good image was in the same failed batch or the next one; either way it is answered.
        try:
            f_good.result(timeout=30)
        except (ValueError, RuntimeError):
            pass
        assert batcher.submit(good).result(timeout=30).batch_size == 1
    finally:
        batcher.close()


def test_a_pass_waits_for_images_being_decoded(classifier: Classifier) -> None:
    """A request announced as decoding holds the pass (up to the decoding wait), so the two share
    it; with nothing announced a pass starts at once, though the decoding wait is long."""
    batcher = MicroBatcher(classifier, max_batch=64, max_wait_ms=0, decoding_wait_ms=20_000)
    first, second = _images(classifier, 2)
    try:
        alone = batcher.submit(first).result(timeout=10)  # nothing on its way: no wait
        assert alone.batch_size == 1
        with batcher.coming():
            waiting = batcher.submit(first)
            threading.Event().wait(0.3)
            assert not waiting.done()  # held for the image being decoded
        together = batcher.submit(second).result(timeout=30)
        assert waiting.result(timeout=30).batch_size == together.batch_size == 2
    finally:
        batcher.close()


def test_a_decode_that_fails_holds_the_pass_no_longer_than_the_wait(
    classifier: Classifier,
) -> None:
    batcher = MicroBatcher(classifier, max_batch=64, max_wait_ms=0, decoding_wait_ms=200)
    try:
        with batcher.coming():  # announced, never submitted: its decoding failed
            waiting = batcher.submit(_images(classifier, 1)[0])
        assert waiting.result(timeout=30).batch_size == 1
    finally:
        batcher.close()
