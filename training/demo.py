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


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed metal: streaks along a random axis, grain, and a lighting gradient."""
    base = rng.uniform(90, 170)
    streaks = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=(0.6, size / 6))
    streaks *= rng.uniform(4, 9) / (streaks.std() + 1e-6)
    if rng.random() < 0.5:
        streaks = streaks.T
    grain = rng.normal(0, rng.uniform(2, 6), (size, size))
    yy, xx = np.mgrid[0:size, 0:size] / size
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
