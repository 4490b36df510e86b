"""Image decoding and preprocessing shared by the trainer and the service.

Both sides call ``decode_image`` and ``to_array`` so that a part image is resized and converted the
same way at inspection time as it was in training.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# Refuse images whose pixel count could exhaust memory (decompression bombs); 64 megapixels is
# far beyond any camera an inspection line uses for one part.
MAX_IMAGE_PIXELS = 64_000_000
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
    data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Decode and fully load an image from bytes, or raise ImageError naming the problem.

    With ``draft_size``, a JPEG is decoded at the smallest power-of-two reduction that is still at
    least that size: several times faster on large camera images, and identical in the service.
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
            if draft_size is not None and img.format == "JPEG":
                img.draft(img.mode, (draft_size, draft_size))
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


def to_array(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Orientation-corrected, squashed to ``size`` x ``size``, as uint8 CHW with 1 or 3 channels.

    The whole image is resized (not cropped) so that a defect near the border is never cut away.
    """
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF must not lose an otherwise good image
        pass
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # Scale high bit-depth images to 8 bits by their own range rather than clipping.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        backdrop = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(backdrop, img)
    target = "L" if channels == 1 else "RGB"
    img = img.convert(target)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if channels == 1:
        return arr[None, :, :].copy()
    return arr.transpose(2, 0, 1).copy()
