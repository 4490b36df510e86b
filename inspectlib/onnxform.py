"""The deployed models as ONNX files: fp32 exports and int8 quantized copies.

A run's compressed forms live in ``RUN/compressed/``: ``<model>.<form>.onnx`` beside
``<model>.<form>.json`` (what it was made from, its sha256, the preprocessing). The graph takes
the service's own arrays, uint8 N x C x S x S, and does the checkpoint's normalization and the
softmax itself, so any Open Inference Protocol server (Triton, KServe, MLServer) given the file
answers exactly what the service's own model process answers.

Export goes through ``torch.onnx`` and quantization through ONNX Runtime's static quantization
(QDQ, per-channel int8 weights, uint8 activations calibrated on training images); nothing here
edits a graph by hand.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inspectlib.checkpoint import load_checkpoint, preprocess_of, read_meta

# The pruned forms (``compress --prune``) are a smaller network fine-tuned from the deployed one;
# their sidecars name the deployed checkpoint as their source, so a new training invalidates them.
FORMS = ("fp32", "int8", "pruned-fp32", "pruned-int8")
RUNTIMES = ("torch", "onnxruntime")
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
FOLDER = "compressed"
OPSET = 18


class FormError(ValueError):
    """A compressed form is missing, damaged or does not match its run."""


class _Deployable(nn.Module):
    """uint8 images in, class probabilities out: the checkpoint's model with its preprocessing's
    normalization in front and the softmax behind, as the service computes them."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std
        return torch.softmax(self.model(x), dim=1)


def form_path(run_dir: Path, name: str, form: str) -> Path:
    """Where model ``name``'s ``form`` of run ``run_dir`` lives."""
    return Path(run_dir) / FOLDER / f"{name}.{form}.onnx"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_meta(path: Path, meta: dict[str, Any], form: str, extra: dict[str, Any]) -> dict:
    full = {
        "form": form,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "arch": meta["arch"],
        "classes": meta["classes"],
        "preprocess": meta["preprocess"],
        "source_weights_sha256": meta["weights_sha256"],
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "what": "class probabilities"},
        "file": path.name,
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
        **extra,
    }
    path.with_suffix(".json").write_text(json.dumps(full, indent=2))
    return full


def export_fp32(
    checkpoint: Path, out: Path, form: str = "fp32", derived_from: str | None = None
) -> dict[str, Any]:
    """Export a checkpoint to ONNX (one file, dynamic batch); returns the sidecar metadata.
    ``derived_from``: the sha256 of the deployed weights the checkpoint was made from (a pruned
    network's), recorded as the form's source in place of the checkpoint's own."""
    model, meta = load_checkpoint(checkpoint, device="cpu")
    pre = preprocess_of(meta)
    mean, std = pre.tensors("cpu")
    wrapped = _Deployable(model, mean, std).eval()
    example = torch.zeros((2, pre.channels, pre.size, pre.size), dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(
            wrapped,
            (example,),
            str(out),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    extra: dict[str, Any] = {"source": Path(checkpoint).name}
    if derived_from is not None:
        extra["checkpoint_sha256"] = meta["weights_sha256"]
        meta = {**meta, "weights_sha256": derived_from}
    return _write_meta(out, meta, form, extra)


def quantize_int8(
    fp32: Path, out: Path, calibration: np.ndarray, batch: int = 32, form: str = "int8"
) -> dict:
    """Static int8 quantization of an fp32 export, calibrated on ``calibration`` (uint8 arrays
    from the training split, never the test split)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise FormError("int8 calibration needs at least one training image")

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(
                {INPUT_NAME: np.ascontiguousarray(calibration[i : i + batch])}
                for i in range(0, len(calibration), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    out = Path(out)
    prepared = out.with_suffix(".prepared.onnx")
    try:
        # Shape inference and graph optimisation first (batch norm folded into the
        # convolutions), as ONNX Runtime advises before static quantization.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared),
            str(out),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # 7-bit weights: ONNX Runtime's uint8 x int8 kernels on x86 multiply pairs with an
            # instruction (vpmaddubsw) whose 16-bit sums saturate at full-range int8 weights,
            # which cost whole points of accuracy on real runs (BENCHMARKS.md).
            reduce_range=True,
            # The layers with weights only: the normalization in front and the softmax behind
            # stay in float, so the probabilities keep their resolution for the thresholds.
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
        )
    finally:
        prepared.unlink(missing_ok=True)
    meta = json.loads(Path(fp32).with_suffix(".json").read_text())
    source = {k: meta[k] for k in ("arch", "classes", "preprocess")}
    source["weights_sha256"] = meta["source_weights_sha256"]
    return _write_meta(
        out,
        source,
        form,
        {
            "source": Path(fp32).name,
            "quantization": {
                "tool": "onnxruntime.quantization.quantize_static",
                "format": "QDQ",
                "weights": "int8 (7-bit range), per channel",
                "activations": "uint8, min-max calibration",
                "quantized_ops": ["Conv", "Gemm", "MatMul"],
                "calibration_images": int(len(calibration)),
            },
        },
    )


def read_form(path: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    """A form's sidecar, checked: the file is there, unaltered, and (given its run's checkpoint)
    made from the weights that run deployed."""
    path = Path(path)
    meta_file = path.with_suffix(".json")
    if not path.is_file() or not meta_file.is_file():
        how = " --prune 0.5" if ".pruned-" in path.name else ""
        raise FormError(
            f"{path} not found: run `maxmin-inspect compress {path.parent.parent}{how}`"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as exc:
        raise FormError(f"{meta_file} is not valid JSON: {exc}") from None
    if sha256(path) != meta.get("sha256"):
        raise FormError(
            f"{path} does not match the sha256 in {meta_file.name}: altered or replaced"
        )
    if checkpoint is not None:
        source = read_meta(checkpoint)["weights_sha256"]
        if meta.get("source_weights_sha256") != source:
            raise FormError(
                f"{path} was made from other weights than {Path(checkpoint).name}: "
                f"run `maxmin-inspect compress {path.parent.parent}` again"
            )
    return meta


def session(path: Path, threads: int = 1):
    """An ONNX Runtime session on the CPU with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, arrays: np.ndarray) -> np.ndarray:
    """Class probabilities (N x K, float32) for uint8 arrays."""
    return sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(arrays, dtype=np.uint8)})[0]
