"""Checkpoints: safetensors weights (loading runs no code) beside JSON metadata.

The metadata carries what is needed to rebuild the model (arch, constructor arguments, classes)
and to preprocess images exactly as in training (the ``preprocess`` block, an
``inspectlib.preprocess.Preprocess``), and the sha256 of the weights file, so a file that was
altered or swapped is refused at load.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from inspectlib.preprocess import Preprocess, PreprocessError
from models import create_model

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not match its metadata."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    state_dict: dict[str, torch.Tensor], meta: dict[str, Any], path: Path
) -> dict[str, Any]:
    """Write ``path``.safetensors and ``path``.json; returns the metadata as written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.with_suffix(".safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(weights), metadata={"arch": str(meta["arch"])})
    full = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **meta,
        "weights_file": weights.name,
        "weights_sha256": _sha256(weights),
        "weights_bytes": weights.stat().st_size,
    }
    path.with_suffix(".json").write_text(json.dumps(full, indent=2))
    return full


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata, checked for what loading and preprocessing need; the weights are
    neither read nor hashed (``load_checkpoint`` does that)."""
    meta_file = Path(path).with_suffix(".json")
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint metadata {meta_file} not found") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata {meta_file} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata {meta_file} is not a JSON object")
    for key in ("arch", "model_kwargs", "classes", "weights_sha256"):
        if key not in meta:
            raise CheckpointError(f"checkpoint metadata {meta_file} lacks '{key}'")
    try:
        pre = Preprocess.from_checkpoint(meta)
    except PreprocessError as exc:
        raise CheckpointError(f"checkpoint {meta_file}: {exc}") from None
    kwargs = meta["model_kwargs"]
    if (kwargs.get("in_channels"), kwargs.get("image_size")) != (pre.channels, pre.size):
        raise CheckpointError(
            f"checkpoint {meta_file}: the model's input and the preprocessing disagree"
        )
    meta["preprocess"] = pre.to_dict()
    if len(meta["classes"]) != meta["model_kwargs"].get("num_classes"):
        raise CheckpointError(f"checkpoint {meta_file}: class list and num_classes disagree")
    return meta


def preprocess_of(meta: dict[str, Any]) -> Preprocess:
    """The preprocessing a checkpoint's model was trained with (``meta`` from ``read_meta``)."""
    return Preprocess.from_dict(meta["preprocess"])


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from ``path``.json and load ``path``.safetensors; refuse any mismatch."""
    path = Path(path)
    meta = read_meta(path)
    meta_file = path.with_suffix(".json")
    weights = path.with_suffix(".safetensors")
    if not weights.is_file():
        raise CheckpointError(f"checkpoint weights {weights} not found")
    if _sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(
            f"checkpoint weights {weights} do not match the sha256 in {meta_file.name}: "
            "the file was altered or replaced"
        )
    try:
        model = create_model(meta["arch"], **meta["model_kwargs"])
        state = load_file(str(weights), device="cpu")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {weights} does not fit its metadata: {exc}") from None
    return model.to(device).eval(), meta
