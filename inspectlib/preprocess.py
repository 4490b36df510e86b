"""The one preprocessing specification: how a part image becomes a model's input.

The trainer writes a ``Preprocess`` into every checkpoint (its ``preprocess`` block) and decodes its
training images through it; the service reads it back and decodes uploads through the same
methods. Nothing else states the input size, the channels, the resize or the normalization, so the
two sides cannot drift apart. ``PREPROCESS_VERSION`` names the pixels ``decode`` produces: change it
with any change to decoding or resizing, and checkpoints made before are refused with a message
rather than fed inputs they were not trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from inspectlib.imaging import MAX_IMAGE_PIXELS, decode_image, to_array

PREPROCESS_VERSION = 1
RESIZE = "bilinear-squash"  # the whole image resized to a square: a defect at the border stays


class PreprocessError(ValueError):
    """A preprocessing specification this version cannot apply; the message says why."""


@dataclass(frozen=True)
class Preprocess:
    """Input size and channels, resize method, and the training set's per-channel statistics."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = RESIZE
    version: int = PREPROCESS_VERSION

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise PreprocessError(f"channels must be 1 or 3, not {self.channels}")
        if self.size < 1:
            raise PreprocessError(f"size must be positive, not {self.size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise PreprocessError("mean and std need one value per channel")
        if self.resize != RESIZE:
            raise PreprocessError(f"unknown resize {self.resize!r}; this version applies {RESIZE}")
        if self.version != PREPROCESS_VERSION:
            raise PreprocessError(
                f"preprocessing version {self.version}, but this version of maxmin-inspect "
                f"applies version {PREPROCESS_VERSION}: train the run again"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        try:
            return cls(
                size=int(d["size"]),
                channels=int(d["channels"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                resize=str(d.get("resize", RESIZE)),
                version=int(d.get("version", PREPROCESS_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PreprocessError):
                raise
            raise PreprocessError(f"preprocessing specification is incomplete: {exc}") from None

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any]) -> Preprocess:
        """From a checkpoint's metadata; checkpoints written before the ``preprocess`` block carry
        the same facts under older keys and the first version's pixels."""
        if "preprocess" in meta:
            return cls.from_dict(meta["preprocess"])
        norm = meta.get("normalization") or {}
        return cls.from_dict(
            {
                "size": meta.get("image_size"),
                "channels": meta.get("channels"),
                "mean": norm.get("mean"),
                "std": norm.get("std"),
                "version": 1,
            }
        )

    def image(
        self,
        data: bytes,
        max_pixels: int = MAX_IMAGE_PIXELS,
        before_load: Callable[[int, int], AbstractContextManager] | None = None,
    ) -> Image.Image:
        """Decode an upload or a file's bytes (raises ImageError naming the problem)."""
        return decode(data, self.size, max_pixels, before_load)

    def array(self, img: Image.Image) -> np.ndarray:
        """A decoded image as the models' uint8 C x S x S array."""
        return model_array(img, self.size, self.channels)

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as broadcastable 1 x C x 1 x 1 tensors, for ``normalize``."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return mean, std


def decode(
    data: bytes,
    size: int,
    max_pixels: int = MAX_IMAGE_PIXELS,
    before_load: Callable[[int, int], AbstractContextManager] | None = None,
) -> Image.Image:
    """Step one, for a model of input ``size``: the file's pixels (a JPEG decoded at the smallest
    reduction still at least ``size``). The trainer calls it before it knows the statistics."""
    return decode_image(data, max_pixels=max_pixels, draft_size=size, before_load=before_load)


def model_array(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Step two: orientation, colour mode, resize, as uint8 C x S x S."""
    return to_array(img, size, channels)


def normalize(batch_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float, scaled to [0, 1] and standardised with the training statistics."""
    return (batch_u8.float().div_(255.0) - mean) / std
