"""Loading the A/B models of a training run and classifying images exactly as training saw them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from inspectlib import onnxform
from inspectlib.checkpoint import load_checkpoint, preprocess_of, read_meta
from inspectlib.device import resolve_device
from inspectlib.preprocess import Preprocess, normalize


class ModelRunner(Protocol):
    """What the micro-batcher calls: the models in this process (``Classifier``), in a process
    of their own (``ModelProcess``), or in the host shared by all workers (``HostRun``)."""

    def classify(self, arrays: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        """Per model: class probabilities (N x K) and the model's time per image in ms."""
        ...


class ModelsUnavailable(RuntimeError):
    """No usable trained models: the message says what to do."""


@dataclass
class ModelInfo:
    name: str
    meta: dict  # the checkpoint's metadata
    version: str  # checkpoint file and weights hash, stored with every prediction


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


SERVABLE = (("torch", "fp32"), *(("onnxruntime", form) for form in onnxform.FORMS))
# Each servable form's name in the report's compression study (fp32 PyTorch is its reference).
STUDY_FORMS = {
    ("onnxruntime", "fp32"): "onnx-fp32",
    ("onnxruntime", "int8"): "onnx-int8",
    ("onnxruntime", "pruned-fp32"): "pruned-fp32",
    ("onnxruntime", "pruned-int8"): "pruned-int8",
}


class ServedRun:
    """What the web process needs of a run's A/B models: their classes, versions and the one
    preprocessing they share, read from the checkpoints' metadata. No weights are loaded: when the
    models run in a process of their own, this is all the web process holds of them."""

    def __init__(
        self, run_dir: Path, names: list[str], runtime: str = "torch", form: str = "fp32"
    ) -> None:
        if (runtime, form) not in SERVABLE:
            raise ModelsUnavailable(
                f"cannot serve the {form} form with the {runtime} runtime; choose one of "
                + ", ".join(f"{r}/{f}" for r, f in SERVABLE)
            )
        self.runtime, self.form = runtime, form
        self.run_dir = Path(run_dir)
        report_file = self.run_dir / "report.json"
        if not report_file.is_file():
            raise ModelsUnavailable(
                f"{report_file} not found: train first (`maxmin-inspect train`)"
            )
        report = json.loads(report_file.read_text())
        self.models: dict[str, ModelInfo] = {}
        self._checkpoints: dict[str, Path] = {}
        for name in names:
            entry = report["models"].get(name)
            if entry is None or not entry.get("checkpoint"):
                raise ModelsUnavailable(f"run {self.run_dir} has no usable checkpoint for {name!r}")
            path = self.run_dir / entry["checkpoint"]
            meta = read_meta(path)
            version = f"{Path(entry['checkpoint']).name}:{meta['weights_sha256'][:12]}"
            if runtime == "onnxruntime":
                # The answer names the file it came from: "<model>.<form>.onnx:<sha256>".
                form_file = onnxform.form_path(self.run_dir, name, form)
                try:
                    form_meta = onnxform.read_form(form_file, path)
                except onnxform.FormError as exc:
                    raise ModelsUnavailable(str(exc)) from None
                version = f"{form_file.name}:{form_meta['sha256'][:12]}"
                path = form_file
            self.models[name] = ModelInfo(name, meta, version)
            self._checkpoints[name] = path
        first = next(iter(self.models.values())).meta
        for m in self.models.values():
            for key in ("classes", "preprocess"):
                if m.meta[key] != first[key]:
                    raise ModelsUnavailable(f"models {names} disagree on {key}; serve one run")
        self.classes: list[str] = first["classes"]
        self.preprocess: Preprocess = preprocess_of(first)
        self._report_file = report_file
        self._report_mtime = report_file.stat().st_mtime_ns
        try:
            self.thresholds = self._thresholds(report, names, self.form)
        except (KeyError, TypeError):  # only a pruned form's come from elsewhere: the study
            raise ModelsUnavailable(
                f"{report_file} holds no operating point for the pruned forms: run "
                f"`maxmin-inspect compress {self.run_dir} --prune 0.5` again"
            ) from None
        self.good_class: str | None = (report.get("metric") or {}).get("good_class")
        self.form_study = self._form_study(report, names, runtime, form)
        self.run_name = self.run_dir.name
        self.batcher = None  # the micro-batcher feeding these models, set by the service

    @staticmethod
    def _thresholds(report: dict, names: list[str], form: str = "fp32") -> dict[str, float | None]:
        """The operating point (inspectlib.decision): each model's confidence threshold, chosen
        at training time or set again since; runs trained before it have none, and then only
        disagreement goes to review."""
        if form.startswith("pruned"):  # the pruned network's own threshold (training/compress.py)
            studied = report["compression"]["models"]
            return {n: studied[n]["pruning"]["operating_point"]["threshold"] for n in names}
        return {
            name: (report["models"][name].get("operating_point") or {}).get("threshold")
            for name in names
        }

    @staticmethod
    def _form_study(report: dict, names: list[str], runtime: str, form: str) -> dict | None:
        """What the run's compression study found for the served form against fp32 PyTorch, on
        its test images: per model the macro F1 change, McNemar's p, and whether the form answered
        reliably worse (a loss with p < 0.05). None for fp32 PyTorch (the reference) or a run
        without the study of this form."""
        key = STUDY_FORMS.get((runtime, form))
        study = report.get("compression") or {}
        if key is None or key not in study.get("forms", []):
            return None
        models = {}
        for name in names:
            try:
                found = study["models"][name]["forms"][key]
                change, p = found["macro_f1_change"], found["mcnemar_vs_fp32"]["p_value"]
            except (KeyError, TypeError):  # a study made before this model or form: say nothing
                return None
            models[name] = {
                "macro_f1_change": change,
                "p_value": p,
                "worse": change < 0 and p < 0.05,
            }
        return {"test_images": study.get("test_images"), "models": models}

    def refresh_thresholds(self) -> bool:
        """Read the thresholds again when ``report.json`` has changed (a new target, see
        ``inspectlib.decision.retarget_run``); True when they were replaced."""
        try:
            mtime = self._report_file.stat().st_mtime_ns
            if mtime == self._report_mtime:
                return False
            report = json.loads(self._report_file.read_text())
            thresholds = self._thresholds(report, list(self.models), self.form)
        except (OSError, ValueError, KeyError, TypeError):
            return False  # being rewritten or gone: keep the thresholds in use
        self._report_mtime = mtime
        self.thresholds = thresholds  # one assignment: a request sees the old or the new ones
        return True

    def decode(
        self,
        data: bytes,
        max_pixels: int,
        before_load: Callable[[int, int], AbstractContextManager] | None = None,
    ) -> Decoded:
        """Decode and preprocess one upload; raises ImageError naming what is wrong.
        ``before_load(width, height)`` is held while the pixels are decoded."""
        t0 = time.perf_counter()
        img = self.preprocess.image(data, max_pixels, before_load)
        t1 = time.perf_counter()
        width, height = img.info.get("original_size", img.size)
        ctype = FORMAT_TYPES.get(img.format or "", "application/octet-stream")
        array = self.preprocess.array(img)
        return Decoded(array, width, height, ctype, t1 - t0, time.perf_counter() - t1)


class Classifier(ServedRun):
    """The A/B models of one run with their weights, sharing that run's preprocessing.

    ``parallel`` (auto, true, false): on the CPU, run the models side by side, one thread each,
    rather than one after the other; auto and true mean the same here (the service passes
    ``MAXMIN_PARALLEL_MODELS``). On few cores the model process runs one intra-op thread, to leave
    the others to the web process; two models side by side use what it leaves
    (``bench/serve_bench.py``, side ``service-serial-models``, compares)."""

    def __init__(
        self,
        run_dir: Path,
        names: list[str],
        device: str = "auto",
        parallel: str = "false",
        *,
        runtime: str = "torch",
        form: str = "fp32",
        threads: int | None = None,
    ) -> None:
        super().__init__(run_dir, names, runtime, form)
        self.nets: dict[str, nn.Module] = {}
        self.sessions: dict = {}
        # The ONNX forms run on the CPU: they are for machines without PyTorch's GPU stack.
        self.device = torch.device("cpu") if runtime == "onnxruntime" else resolve_device(device)
        self.parallel = (
            len(self.models) > 1 and self.device.type == "cpu" and parallel in ("true", "auto")
        )
        if runtime == "onnxruntime":
            per_model = max(1, (threads or 1) // len(self.models)) if self.parallel else threads
            for name in self.models:
                self.sessions[name] = onnxform.session(self._checkpoints[name], per_model or 1)
        else:
            for name in self.models:
                model, _ = load_checkpoint(self._checkpoints[name], device=self.device)
                if self.device.type == "cpu":
                    # Convolutions run faster on channels-last tensors (bench/layout_bench.py).
                    model = model.to(memory_format=torch.channels_last)
                self.nets[name] = model
            self.mean, self.std = self.preprocess.tensors(self.device)
        self._pool = (
            ThreadPoolExecutor(len(self.models), thread_name_prefix="model")
            if self.parallel
            else None
        )
        p = self.preprocess
        self.classify(np.zeros((2, p.channels, p.size, p.size), dtype=np.uint8))  # warm up
        if threads is not None and not self.sessions:
            self.set_threads(threads)

    def set_threads(self, threads: int) -> None:
        """The process's torch threads for these models: shared between them when they run side
        by side."""
        torch.set_num_threads(max(1, threads // len(self.models)) if self.parallel else threads)

    @torch.inference_mode()
    def classify(self, arrays: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        """Per model: class probabilities (N x K) and the model's time per image in ms."""
        if self.sessions:
            return self._classify_onnx(arrays)
        x = normalize(
            torch.from_numpy(np.ascontiguousarray(arrays)).to(self.device), self.mean, self.std
        )
        if self.device.type == "cuda":
            return self._classify_cuda(x)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        n = max(len(arrays), 1)

        def run(model: nn.Module) -> tuple[np.ndarray, float]:
            with torch.inference_mode():  # per thread
                t0 = time.perf_counter()
                probs = torch.softmax(model(x).float(), dim=1).cpu().numpy()
                return probs, (time.perf_counter() - t0) * 1000 / n

        nets = list(self.nets.values())
        answers = self._pool.map(run, nets) if self._pool is not None else map(run, nets)
        return dict(zip(self.nets, answers, strict=True))

    def _classify_onnx(self, arrays: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        """The ONNX forms take the uint8 arrays as they are: normalization and softmax are in
        the graph. ONNX Runtime releases the GIL, so side by side runs in threads."""
        n = max(len(arrays), 1)

        def run(sess) -> tuple[np.ndarray, float]:  # noqa: ANN001
            t0 = time.perf_counter()
            probs = onnxform.run(sess, arrays)
            return probs, (time.perf_counter() - t0) * 1000 / n

        sessions = list(self.sessions.values())
        answers = self._pool.map(run, sessions) if self._pool is not None else map(run, sessions)
        return dict(zip(self.sessions, answers, strict=True))

    def _classify_cuda(self, x: torch.Tensor) -> dict[str, tuple[np.ndarray, float]]:
        """Every model queued on the GPU, one copy back, one wait that sleeps.

        By default CUDA waits for the GPU by spinning a CPU core (one context per process, fewer
        than the cores). With a model process per web worker that is a core per worker burnt while
        the GPU works, taken from the web workers that parse and store requests. Events created
        with ``blocking=True`` wait by yielding the CPU instead; their timings give each model's
        GPU time."""
        stamps = [torch.cuda.Event(enable_timing=True) for _ in range(len(self.nets) + 1)]
        stamps[0].record()
        probs = []
        for k, model in enumerate(self.nets.values()):
            probs.append(torch.softmax(model(x).float(), dim=1))
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
            for k, name in enumerate(self.nets)
        }
