"""Why the models run in a process of their own: one batch through both models, timed alone, beside
a busy Python thread (as the event loop is under load), and through ModelProcess beside the same
busy thread. Side by side in one run; medians.
Usage: python bench/gil_bench.py RUN_DIR [--batch 16] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from app.core.inference import Classifier
from app.core.model_process import ModelProcess, ModelsToLoad


def _busy(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))  # pure Python: holds the GIL, like parsing requests


def _time(call: Callable[[], object], seconds: float, busy: bool) -> float:
    stop = threading.Event()
    thread = threading.Thread(target=_busy, args=(stop,), daemon=True)
    if busy:
        thread.start()
    try:
        for _ in range(3):
            call()
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        stop.set()
        if busy:
            thread.join()
    return round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    local = Classifier(args.run_dir, ["baseline", "maxmin"], "cpu")
    shape = (args.batch, local.channels, local.size, local.size)
    batch = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    remote = ModelProcess(ModelsToLoad(args.run_dir, ("baseline", "maxmin"), "cpu"))
    try:
        out = {
            "batch": args.batch,
            "in_thread_alone_ms": _time(lambda: local.classify(batch), args.seconds, False),
            "in_thread_beside_busy_python_ms": _time(
                lambda: local.classify(batch), args.seconds, True
            ),
            "model_process_beside_busy_python_ms": _time(
                lambda: remote.classify(batch), args.seconds, True
            ),
        }
    finally:
        remote.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
