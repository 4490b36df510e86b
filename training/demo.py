"""A synthetic parts dataset: brushed-metal surfaces, good or with a scratch, a dent or spots.

Used by the quick start on a machine that has no company images yet. Defects vary in contrast,
size and position and sit on noisy, unevenly lit texture, so the classes are not trivially separable
(some defects are faint enough to be missed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

DEMO_CLASSES = ("dent", "good", "scratch", "spots")


def _surface(rng: np.random.Generator, size: int, width: int | None = None) -> np.ndarray:
    """Brushed metal: streaks along a random axis, grain, and a lighting gradient."""
    h, w = size, width or size
    base = rng.uniform(90, 170)
    noise = rng.normal(0, 1, (h, w))
    streaks = ndimage.gaussian_filter(noise, sigma=(0.6, w / 6))
    gain = rng.uniform(4, 9)
    if rng.random() < 0.5:  # streaks across instead of along
        streaks = streaks.T if h == w else ndimage.gaussian_filter(noise, sigma=(h / 6, 0.6))
    streaks *= gain / (streaks.std() + 1e-6)
    grain = rng.normal(0, rng.uniform(2, 6), (h, w))
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    angle = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(5, 25) * (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)
    return base + streaks + grain + light


def _scratch(rng: np.random.Generator, img: np.ndarray) -> None:
    size = img.shape[0]
    length = rng.uniform(0.25, 0.8) * size
    angle = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    t = np.linspace(-length / 2, length / 2, int(length * 3))
    xs = np.clip((cx + t * np.cos(angle)).astype(int), 0, size - 1)
    ys = np.clip((cy + t * np.sin(angle)).astype(int), 0, size - 1)
    mask = np.zeros_like(img)
    mask[ys, xs] = 1.0
    mask = ndimage.gaussian_filter(mask, rng.uniform(0.8, 1.5))
    mask /= mask.max() + 1e-6
    img += rng.choice([-1, 1]) * rng.uniform(30, 70) * mask


def _dent(rng: np.random.Generator, img: np.ndarray) -> None:
    """A shallow dent: a bump lit from one side, so one half is bright and the other dark."""
    size = img.shape[0]
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    r = rng.uniform(0.08, 0.18) * size
    yy, xx = np.mgrid[0:size, 0:size]
    bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2 * rng.uniform(0.5, 2)) / (2 * r**2))
    gy, gx = np.gradient(bump)
    angle = rng.uniform(0, 2 * np.pi)
    shade = np.cos(angle) * gx + np.sin(angle) * gy
    img += rng.uniform(25, 50) * shade / (np.abs(shade).max() + 1e-6)


def _spots(rng: np.random.Generator, img: np.ndarray) -> None:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(rng.integers(1, 5)):
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        r = rng.uniform(0.03, 0.07) * size
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
        img -= rng.uniform(25, 55) * blob


_DEFECTS = {"dent": _dent, "scratch": _scratch, "spots": _spots}


def make_image(label: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """One synthetic surface image of class ``label``."""
    img = _surface(rng, size)
    if label != "good":
        _DEFECTS[label](rng, img)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")


def make_demo_dataset(
    out_dir: Path, per_class: int = 150, size: int = 96, seed: int = 0, progress: bool = True
) -> Path:
    """Write ``per_class`` PNG images for each demo class under ``out_dir/<class>/``."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    jobs = [(label, i) for label in DEMO_CLASSES for i in range(per_class)]
    for label in DEMO_CLASSES:
        (out_dir / label).mkdir(parents=True, exist_ok=True)
    for label, i in tqdm(jobs, desc="generating demo parts", unit="img", disable=not progress):
        make_image(label, rng, size).save(out_dir / label / f"{label}_{i:04d}.png")
    return out_dir


# The stress set: what real plant data does to a trainer that the demo set does not. Most parts
# are good (1:30 against the rarest defect), images come in many sizes and aspect ratios, and the
# defects are small and faint against the texture.
STRESS_COUNTS = {"good": 900, "scratch": 120, "spots": 60, "dent": 30}


def _faint(rng: np.random.Generator, label: str, h: int, w: int) -> np.ndarray:
    """A small, low-contrast defect of class ``label`` as an additive h x w map."""
    yy, xx = np.mgrid[0:h, 0:w]
    side = min(h, w)
    cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
    contrast = rng.uniform(20, 40)
    if label == "spots":
        out = np.zeros((h, w))
        for _ in range(rng.integers(2, 4)):
            px, py = cx + rng.normal(0, 0.06 * side), cy + rng.normal(0, 0.06 * side)
            r = rng.uniform(0.03, 0.05) * side
            out -= contrast * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * r**2))
        return out
    if label == "scratch":
        length, angle = rng.uniform(0.2, 0.4) * side, rng.uniform(0, np.pi)
        t = np.linspace(-length / 2, length / 2, int(length * 3) + 2)
        mask = np.zeros((h, w))
        mask[
            np.clip((cy + t * np.sin(angle)).astype(int), 0, h - 1),
            np.clip((cx + t * np.cos(angle)).astype(int), 0, w - 1),
        ] = 1.0
        mask = ndimage.gaussian_filter(mask, max(1.0, side / 70))
        return rng.choice([-1, 1]) * contrast * mask / (mask.max() + 1e-6)
    r = rng.uniform(0.07, 0.12) * side  # dent: a small bump lit from one side
    bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
    gy, gx = np.gradient(bump)
    angle = rng.uniform(0, 2 * np.pi)
    shade = np.cos(angle) * gx + np.sin(angle) * gy
    return contrast * 1.5 * shade / (np.abs(shade).max() + 1e-6)


def make_stress_image(label: str, rng: np.random.Generator) -> Image.Image:
    """One stress-set image: 80-400 px on its long side, aspect ratio up to 1:2.5."""
    long_side = int(rng.uniform(80, 400))
    short = max(40, int(long_side / rng.uniform(1.0, 2.5)))
    h, w = (long_side, short) if rng.random() < 0.5 else (short, long_side)
    img = _surface(rng, h, w)
    if label != "good":
        img += _faint(rng, label, h, w)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")


def make_stress_dataset(
    out_dir: Path, scale: float = 1.0, seed: int = 0, progress: bool = True
) -> Path:
    """Write the stress set (``STRESS_COUNTS`` images per class, times ``scale``) as PNGs."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    jobs = [
        (label, i) for label, n in STRESS_COUNTS.items() for i in range(max(4, round(n * scale)))
    ]
    for label in STRESS_COUNTS:
        (out_dir / label).mkdir(parents=True, exist_ok=True)
    for label, i in tqdm(jobs, desc="generating stress parts", unit="img", disable=not progress):
        make_stress_image(label, rng).save(out_dir / label / f"{label}_{i:04d}.png")
    return out_dir
