"""Image decoding and preprocessing shared by the trainer and the service.

Both sides call ``decode_image`` and ``to_array`` so that a part image is resized and converted the
same way at inspection time as it was in training.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# Refuse images whose pixel count could exhaust memory (decompression bombs); 64 megapixels is
# far beyond any camera an inspection line uses for one part.
MAX_IMAGE_PIXELS = 64_000_000
# Refuse shapes no part image has: the resize to a square would first stretch a 1-pixel-wide strip
# to the model's width at its full length, an intermediate thousands of times the file's size.
MAX_ASPECT_RATIO = 32
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
# The formats cameras and inspection systems write. Pillow knows many more; each one opened is
# decoder code exposed to uploads (EPS would even be handed to Ghostscript), so the rest are
# refused by name. Add one here only deliberately.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")


class ImageError(ValueError):
    """The bytes are not a usable image; the message says why in plain words."""


class ImageTooLarge(ImageError):
    """The pixel count is over the limit (a decompression bomb or a wrong camera setting)."""


class UnsupportedFormat(ImageError):
    """An image, but in a format outside ALLOWED_FORMATS; the message names it."""


def _refuse_format(data: bytes) -> ImageError:
    """Why bytes no allowed format could open are refused: the format named when Pillow knows it
    (read from the header only, nothing is decoded), or not an image at all."""
    try:
        with Image.open(io.BytesIO(data)) as other:
            name = other.format
    except Exception:  # noqa: BLE001 - anything Pillow cannot even identify is not an image
        return ImageError("not a recognised image format")
    allowed = ", ".join(ALLOWED_FORMATS)
    return UnsupportedFormat(f"{name} images are not accepted; use one of {allowed}")


def decode_image(
    data: bytes,
    max_pixels: int = MAX_IMAGE_PIXELS,
    draft_size: int | None = None,
    before_load: Callable[[int, int], AbstractContextManager] | None = None,
) -> Image.Image:
    """Decode and fully load an image from bytes, or raise ImageError naming the problem.

    The header is checked before any pixel is decoded: the pixel limit and the aspect ratio. With
    ``draft_size``, a JPEG is decoded at the smallest power-of-two reduction that is still at
    least that size: several times faster on large camera images, and identical in the service.
    ``before_load(width, height)``, when given, is a context manager held while the pixels are
    decoded (the service's decode-memory budget).
    """
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} pixels, more than the limit of {max_pixels}"
                )
            if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
                raise ImageError(
                    f"image is {width}x{height} pixels: sides more than {MAX_ASPECT_RATIO} times "
                    "apart are not a part image"
                )
            if draft_size is not None and img.format == "JPEG":
                img.draft(img.mode, (draft_size, draft_size))
            with before_load(*img.size) if before_load is not None else nullcontext():
                img.load()
            img.info["original_size"] = (width, height)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image too large (decompression bomb guard): {exc}") from None
    except Image.UnidentifiedImageError:
        raise _refuse_format(data) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    if width == 0 or height == 0:
        raise ImageError("image has zero size")
    return img


def is_grey(img: Image.Image) -> bool:
    """True when the image carries one intensity: a grey mode, or colour with equal channels.

    Many cameras and datasets save grey images as RGB (NEU does); treating those as colour would
    triple the first layer's inputs for nothing. A tolerance of 2 levels absorbs JPEG rounding.
    """
    if img.mode in GREY_MODES:
        return True
    if img.mode not in ("RGB", "YCbCr"):
        return False
    arr = np.asarray(img.convert("RGB"), dtype=np.int16)
    return bool(
        np.abs(arr[..., 0] - arr[..., 1]).max() <= 2
        and np.abs(arr[..., 1] - arr[..., 2]).max() <= 2
    )


def _on_white(img: Image.Image, mode: str) -> Image.Image:
    """An RGBA image composited over white, in ``mode``: a block of rows at a time, so a large
    image never has three full-size RGBA copies at once."""
    out = Image.new(mode, img.size)
    rows = max(1, (1 << 20) // img.width)
    white = Image.new("RGBA", (img.width, rows), (255, 255, 255, 255))
    for top in range(0, img.height, rows):
        strip = img.crop((0, top, img.width, min(top + rows, img.height)))
        backdrop = white if strip.height == rows else white.crop((0, 0, img.width, strip.height))
        out.paste(Image.alpha_composite(backdrop, strip).convert(mode), (0, top))
    return out


def to_array(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Orientation-corrected, squashed to ``size`` x ``size``, as uint8 CHW with 1 or 3 channels.

    The whole image is resized (not cropped) so that a defect near the border is never cut away.
    """
    try:
        ImageOps.exif_transpose(img, in_place=True)  # no copy of a large image
    except Exception:  # noqa: BLE001 - broken EXIF must not lose an otherwise good image
        pass
    target = "L" if channels == 1 else "RGB"
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # Scale high bit-depth images to 8 bits by their own range rather than clipping, a block
        # of rows at a time: float64 copies of a whole large image would cost gigabytes.
        arr = np.asarray(img)
        lo, hi = float(arr.min()), float(arr.max())
        out = np.zeros(arr.shape, dtype=np.uint8)
        if hi > lo:
            rows = max(1, (1 << 20) // max(1, arr.shape[1]))
            for r in range(0, arr.shape[0], rows):
                block = arr[r : r + rows].astype(np.float64)
                out[r : r + rows] = ((block - lo) / (hi - lo) * 255.0).astype(np.uint8)
        img = Image.fromarray(out, mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = _on_white(img if img.mode == "RGBA" else img.convert("RGBA"), target)
    if img.mode != target:
        img = img.convert(target)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        return arr[None, :, :].copy()
    return arr.transpose(2, 0, 1).copy()
