"""Labelled image folders and CSV manifests: scan, decode once, deduplicate, split, cache.

Real data is messy, so unreadable files are skipped and listed with the reason; problems that make a
fair comparison impossible (one class, an empty class, too few images to split) stop the run with a
message that names the class.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from inspectlib.datasets import DataError, Entry, scan_source
from inspectlib.imaging import ImageError, is_grey
from inspectlib.preprocess import PREPROCESS_VERSION, Preprocess, decode, model_array

CACHE_VERSION = "2"  # bump whenever the cache file changes; PREPROCESS_VERSION covers pixels
SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """Decoded, deduplicated and split images, resident in one uint8 tensor."""

    images: torch.Tensor  # N x C x S x S, uint8
    labels: torch.Tensor  # N, int64
    split: np.ndarray  # N strings: "train" / "val" / "test"
    paths: list[str]
    classes: list[str]
    channels: int
    size: int
    fingerprint: str
    image_sizes: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates: dict = field(default_factory=dict)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    from_cache: bool = False

    def indices(self, split: str) -> np.ndarray:
        """Positions of the images in ``split``."""
        return np.flatnonzero(self.split == split)

    def resident(
        self, device: torch.device
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Each split's images (uint8; channels-last on the CPU) and labels, moved to ``device``
        once, with the normalization as broadcastable tensors."""
        splits = {}
        for name in SPLITS:
            idx = torch.as_tensor(self.indices(name))
            images = self.images[idx].to(device)
            if device.type == "cpu":
                images = images.contiguous(memory_format=torch.channels_last)
            splits[name] = (images, self.labels[idx].to(device))
        mean, std = self.preprocess.tensors(device)
        return splits, mean, std

    @property
    def preprocess(self) -> Preprocess:
        """How these images were made from the files, and their statistics: what a checkpoint
        trained on them records, and what the service applies to uploads."""
        return Preprocess(self.size, self.channels, tuple(self.mean), tuple(self.std))

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        out: dict[str, dict[str, int]] = {}
        for name in SPLITS:
            labels = self.labels[self.indices(name)].tolist()
            tally = Counter(labels)
            out[name] = {c: tally.get(i, 0) for i, c in enumerate(self.classes)}
        return out


def _settings_key(entries: list[Entry], size: int, channels: str) -> str:
    h = hashlib.sha256(
        f"v{CACHE_VERSION}|p{PREPROCESS_VERSION}|size={size}|channels={channels}".encode()
    )
    for e in sorted(entries, key=lambda e: (str(e.path), e.label)):
        st = e.path.stat()
        h.update(f"{e.path}|{e.label}|{e.split}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _read(entry: Entry, size: int) -> tuple[str, object, tuple[int, int] | None, bool | None]:
    """sha256 of the file and its decoded image (or the reason it is unusable)."""
    try:
        data = entry.path.read_bytes()
    except OSError as exc:
        return "", f"cannot read file: {exc.strerror or exc}", None, None
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = decode(data, size)
    except ImageError as exc:
        return digest, str(exc), None, None
    return digest, img, img.info.get("original_size", img.size), is_grey(img)


def _stratified_split(
    labels: np.ndarray, fractions: dict[str, float], seed: int, classes: list[str]
) -> np.ndarray:
    """Assign each position to a split, class by class, with at least one image per split."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    names = list(fractions)
    for k, name in enumerate(classes):
        idx = np.flatnonzero(labels == k)
        rng.shuffle(idx)
        if len(idx) < len(names):
            raise DataError(
                f"class '{name}' has {len(idx)} usable image(s); at least {len(names)} are needed "
                f"to put one in each of the {', '.join(names)} splits"
            )
        sizes = {n: max(1, round(len(idx) * f)) for n, f in fractions.items() if n != names[0]}
        start = 0
        for n in names[1:]:
            out[idx[start : start + sizes[n]]] = n
            start += sizes[n]
        if start >= len(idx):  # keep at least one training image
            raise DataError(f"class '{name}' has too few images ({len(idx)}) for the split")
        out[idx[start:]] = names[0]
    return out.astype(str)


def load_dataset(
    source: Path,
    size: int = 64,
    channels: str = "auto",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Dataset:
    """Decode every image of ``source`` once (or load the cache), deduplicate and split it."""
    from tqdm.auto import tqdm

    source = Path(source)
    entries, skipped = scan_source(source)
    key = _settings_key(entries, size, channels)
    split_tag = f"{key}-v{val_fraction}-t{test_fraction}-s{split_seed}"
    cache_file = Path(cache_dir) / f"{key}.safetensors" if cache_dir else None
    cached = None
    if cache_file is not None and cache_file.is_file():
        try:
            tensors = load_file(str(cache_file))
            meta = json.loads(cache_file.with_suffix(".json").read_text())
            cached = tensors, meta
        except (OSError, ValueError):
            cached = None  # a damaged cache is rebuilt, never trusted
    if cached is None:
        arrays, meta = _decode_all(entries, skipped, size, channels, workers, progress, tqdm)
        tensors = {"images": arrays}
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            save_file(tensors, str(tmp))
            cache_file.with_suffix(".json").write_text(json.dumps(meta))
            os.replace(tmp, cache_file)
        from_cache = False
    else:
        tensors, meta = cached
        from_cache = True
    return _assemble(
        source,
        tensors["images"],
        meta,
        size,
        val_fraction,
        test_fraction,
        split_seed,
        split_tag,
        from_cache,
    )


def _decode_all(entries, skipped, size, channels, workers, progress, tqdm):  # noqa: ANN001, ANN202
    """Read, hash and decode every file in parallel; pick the channel count; resize."""
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(workers) as pool:
        results = list(
            tqdm(
                pool.map(lambda e: _read(e, size), entries),
                total=len(entries),
                desc="decoding images",
                unit="img",
                disable=not progress,
            )
        )
    ok = [(e, r) for e, r in zip(entries, results, strict=True) if not isinstance(r[1], str)]
    for e, r in zip(entries, results, strict=True):
        if isinstance(r[1], str):
            skipped.append({"path": str(e.path), "reason": r[1]})
    if channels == "auto":
        n_channels = 1 if all(r[3] for _, r in ok) else 3
    else:
        n_channels = int(channels)
    arrays = np.zeros((len(ok), n_channels, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(workers) as pool:
        for i, arr in enumerate(pool.map(lambda r: model_array(r[1][1], size, n_channels), ok)):
            arrays[i] = arr
    sizes = Counter(f"{r[2][0]}x{r[2][1]}" for _, r in ok)
    meta = {
        "paths": [str(e.path) for e, _ in ok],
        "labels": [e.label for e, _ in ok],
        "splits": [e.split for e, _ in ok],
        "hashes": [r[0] for _, r in ok],
        "skipped": skipped,
        "image_sizes": dict(sizes.most_common()),
        "channels": n_channels,
        "all_labels": sorted({e.label for e in entries}),
    }
    return torch.from_numpy(arrays), meta


def _assemble(
    source: Path,
    images: torch.Tensor,
    meta: dict,
    size: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    split_tag: str,
    from_cache: bool,
) -> Dataset:
    """Deduplicate by content, check the classes, split, and compute normalization."""
    paths, labels, presplit, hashes = meta["paths"], meta["labels"], meta["splits"], meta["hashes"]
    skipped = list(meta["skipped"])
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        groups[h].append(i)
    keep: list[int] = []
    dup_groups = []
    removed = 0
    for members in groups.values():
        if len(members) == 1:
            keep.append(members[0])
            continue
        names = sorted({labels[i] for i in members})
        if len(names) > 1:
            for i in members:
                skipped.append(
                    {
                        "path": paths[i],
                        "reason": f"identical content labelled as {' and '.join(names)}",
                    }
                )
            continue
        # Prefer the test copy so that a pre-split test set stays whole.
        chosen = sorted(members, key=lambda i: presplit[i] != "test")[0]
        keep.append(chosen)
        removed += len(members) - 1
        dup_groups.append(
            {"kept": paths[chosen], "removed": [paths[i] for i in members if i != chosen]}
        )
    keep.sort()
    if not keep:
        raise DataError(f"none of the images in {source} could be read")
    kept_labels = [labels[i] for i in keep]
    classes = sorted(set(kept_labels))
    for name in sorted(set(meta["all_labels"]) - set(classes)):
        raise DataError(f"class '{name}' has no usable images after skipping unreadable files")
    if len(classes) < 2:
        raise DataError(
            f"found only one class ('{classes[0]}') in {source}; a classifier needs at least two"
        )
    y = np.array([classes.index(lbl) for lbl in kept_labels], dtype=np.int64)
    pre = [presplit[i] for i in keep]
    if pre[0] is not None:
        split = np.empty(len(keep), dtype=object)
        test_mask = np.array([p == "test" for p in pre])
        split[test_mask] = "test"
        for k, name in enumerate(classes):
            if not np.any(test_mask & (y == k)):
                raise DataError(f"class '{name}' has no usable images in the test split")
        train_pos = np.flatnonzero(~test_mask)
        inner = _stratified_split(
            y[train_pos], {"train": 1 - val_fraction, "val": val_fraction}, split_seed, classes
        )
        split[train_pos] = inner
        split = split.astype(str)
    else:
        split = _stratified_split(
            y,
            {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction},
            split_seed,
            classes,
        )
    sel = torch.as_tensor(keep)
    imgs = images[sel]
    train_imgs = imgs[torch.as_tensor(np.flatnonzero(split == "train"))].float() / 255.0
    mean = train_imgs.mean(dim=(0, 2, 3))
    std = train_imgs.std(dim=(0, 2, 3)).clamp_min(1e-3)
    fp = hashlib.sha256(f"size={size}|channels={meta['channels']}|{split_tag}".encode())
    for i in sorted(keep, key=lambda i: hashes[i]):
        fp.update(f"{hashes[i]}|{labels[i]}\n".encode())
    return Dataset(
        images=imgs,
        labels=torch.from_numpy(y),
        split=split,
        paths=[paths[i] for i in keep],
        classes=classes,
        channels=int(meta["channels"]),
        size=size,
        fingerprint=fp.hexdigest()[:32],
        image_sizes=meta["image_sizes"],
        skipped=skipped,
        duplicates={"removed": removed, "groups": dup_groups[:100]},
        mean=[round(float(v), 6) for v in mean],
        std=[round(float(v), 6) for v in std],
        from_cache=from_cache,
    )
