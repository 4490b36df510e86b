"""Loading the A/B models of a training run and classifying images exactly as training saw them."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.checkpoint import load_checkpoint
from training.engine import normalize, resolve_device
from training.imaging import decode_image, to_array


class ModelsUnavailable(RuntimeError):
    """No usable trained models: the message says what to do."""


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    meta: dict
    version: str


@dataclass
class Decoded:
    """An upload decoded and preprocessed for the models."""

    array: np.ndarray  # C x S x S uint8
    width: int
    height: int
    content_type: str
    decode_s: float = 0.0  # reading the file format into pixels
    preprocess_s: float = 0.0  # orientation, colour mode, resize, to the model's array


FORMAT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "GIF": "image/gif",
    "WEBP": "image/webp",
}


class Classifier:
    """The A/B models of one run, sharing that run's preprocessing.

    ``parallel`` (auto, true, false): on the CPU, run the models side by side, one thread each,
    rather than one after the other; auto and true mean the same here (the service passes
    ``MAXMIN_PARALLEL_MODELS``). On 2 cores the model process runs one intra-op thread, to leave
    the other core to the web process, which does not use all of it; two models side by side use
    what it leaves: 1.12x the requests/s, 1.25x with AVX2 kernels only (``bench/serve_bench.py``,
    side ``service-serial-models``)."""

    def __init__(
        self, run_dir: Path, names: list[str], device: str = "auto", parallel: str = "false"
    ) -> None:
        self.run_dir = Path(run_dir)
        report_file = self.run_dir / "report.json"
        if not report_file.is_file():
            raise ModelsUnavailable(
                f"{report_file} not found: train first (`maxmin-inspect train`)"
            )
        report = json.loads(report_file.read_text())
        self.device = resolve_device(device)
        self.models: dict[str, LoadedModel] = {}
        for name in names:
            entry = report["models"].get(name)
            if entry is None or not entry.get("checkpoint"):
                raise ModelsUnavailable(f"run {self.run_dir} has no usable checkpoint for {name!r}")
            model, meta = load_checkpoint(self.run_dir / entry["checkpoint"], device=self.device)
            if self.device.type == "cpu":
                # Convolutions run faster on channels-last tensors (bench/layout_bench.py).
                model = model.to(memory_format=torch.channels_last)
            version = f"{Path(entry['checkpoint']).name}:{meta['weights_sha256'][:12]}"
            self.models[name] = LoadedModel(name, model, meta, version)
        first = next(iter(self.models.values())).meta
        for m in self.models.values():
            for key in ("classes", "image_size", "channels", "normalization"):
                if m.meta[key] != first[key]:
                    raise ModelsUnavailable(f"models {names} disagree on {key}; serve one run")
        self.classes: list[str] = first["classes"]
        self.size: int = first["image_size"]
        self.channels: int = first["channels"]
        self.mean = torch.tensor(first["normalization"]["mean"], device=self.device).view(
            1, -1, 1, 1
        )
        self.std = torch.tensor(first["normalization"]["std"], device=self.device).view(1, -1, 1, 1)
        self.run_name = self.run_dir.name
        self.parallel = (
            len(self.models) > 1 and self.device.type == "cpu" and parallel in ("true", "auto")
        )
        self._pool = (
            ThreadPoolExecutor(len(self.models), thread_name_prefix="model")
            if self.parallel
            else None
        )
        self.batcher = None  # the micro-batcher feeding these models, set by the service
        self.classify(np.zeros((2, self.channels, self.size, self.size), dtype=np.uint8))  # warm up

    def set_threads(self, threads: int) -> None:
        """The process's torch threads for these models: shared between them when they run side
        by side."""
        torch.set_num_threads(max(1, threads // len(self.models)) if self.parallel else threads)

    def decode(self, data: bytes, max_pixels: int) -> Decoded:
        """Decode and preprocess one upload; raises ImageError naming what is wrong."""
        t0 = time.perf_counter()
        img = decode_image(data, max_pixels=max_pixels, draft_size=self.size)
        t1 = time.perf_counter()
        width, height = img.info.get("original_size", img.size)
        ctype = FORMAT_TYPES.get(img.format or "", "application/octet-stream")
        array = to_array(img, self.size, self.channels)
        return Decoded(array, width, height, ctype, t1 - t0, time.perf_counter() - t1)

    @torch.inference_mode()
    def classify(self, arrays: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        """Per model: class probabilities (N x K) and the model's time per image in ms."""
        x = normalize(
            torch.from_numpy(np.ascontiguousarray(arrays)).to(self.device), self.mean, self.std
        )
        if self.device.type == "cuda":
            return self._classify_cuda(x)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        n = max(len(arrays), 1)

        def run(m: LoadedModel) -> tuple[np.ndarray, float]:
            with torch.inference_mode():  # per thread
                t0 = time.perf_counter()
                probs = torch.softmax(m.model(x).float(), dim=1).cpu().numpy()
                return probs, (time.perf_counter() - t0) * 1000 / n

        models = list(self.models.values())
        answers = self._pool.map(run, models) if self._pool is not None else map(run, models)
        return {m.name: answer for m, answer in zip(models, answers, strict=True)}

    def _classify_cuda(self, x: torch.Tensor) -> dict[str, tuple[np.ndarray, float]]:
        """Every model queued on the GPU, one copy back, one wait that sleeps.

        By default CUDA waits for the GPU by spinning a CPU core (one context per process, fewer
        than the cores). With a model process per web worker that is a core per worker burnt while
        the GPU works, taken from the web workers that parse and store requests. Events created
        with ``blocking=True`` wait by yielding the CPU instead; their timings give each model's
        GPU time."""
        stamps = [torch.cuda.Event(enable_timing=True) for _ in range(len(self.models) + 1)]
        stamps[0].record()
        probs = []
        for k, m in enumerate(self.models.values()):
            probs.append(torch.softmax(m.model(x).float(), dim=1))
            stamps[k + 1].record()
        stacked = torch.stack(probs)
        host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
        done = torch.cuda.Event(blocking=True)
        done.record()
        done.synchronize()
        n = max(len(x), 1)
        return {
            name: (host[k].numpy(), stamps[k].elapsed_time(stamps[k + 1]) / n)
            for k, name in enumerate(self.models)
        }
