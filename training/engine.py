"""Training and evaluation on a dataset held in one uint8 tensor on the training device.

Every model trained with the same seed sees the same batches in the same order with the same
augmentation, so differences between models come from the models alone.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch import nn

from models import create_model


@dataclass
class TrainConfig:
    """Budget and optimizer shared by every model and seed of a run."""

    epochs: int = 30  # enough for a small CNN on a few thousand images; raise for larger sets
    batch_size: int = 32  # small datasets need enough optimizer steps per epoch
    lr: float = 1e-3  # AdamW peak of the one-cycle schedule; 2e-3 killed MaxMin runs on demo data
    weight_decay: float = 5e-4
    augment: tuple[str, ...] = ("shift", "hflip")  # label-preserving for most part images
    device: str = "cpu"
    amp: bool = True  # bf16 autocast where the hardware computes in bf16 (see bf16_native)


@dataclass
class RunResult:
    """What one model trained with one seed produced."""

    arch: str
    seed: int
    state_dict: dict[str, torch.Tensor]
    train_loss: list[float]
    val_accuracy: list[float]
    best_epoch: int
    test_pred: np.ndarray
    test_prob: np.ndarray
    train_seconds: float
    peak_memory_bytes: int
    diverged: str | None = None  # why the run is excluded from the averages, when it is
    extra: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, the CPU otherwise; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def normalize(batch_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float, scaled to [0, 1] and standardised with the training statistics."""
    return (batch_u8.float().div_(255.0) - mean) / std


def augment(x: torch.Tensor, kinds: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    """Batched random shift (reflect-padded, up to 1/8 of the side) and flips, on x's device."""
    n, _, h, w = x.shape
    if "shift" in kinds:
        pad = max(1, h // 8)
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if "hflip" in kinds:
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
    if "vflip" in kinds:
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(2), x)
    return x


class PeakMemory:
    """Peak memory while a block runs: CUDA allocator peak, or the process's resident-set growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else "process_rss_growth"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            proc = psutil.Process()
            self._base = proc.memory_info().rss
            self._max = self._base

            def sample() -> None:
                while not self._stop.wait(0.01):
                    self._max = max(self._max, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, psutil.Process().memory_info().rss)
            self.peak = int(self._max - self._base)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1): rare defect classes count as much as common ones."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    return counts.sum() / (num_classes * counts)


@functools.cache
def bf16_native(device_type: str) -> bool:
    """Whether this device computes in bf16 natively: CUDA cards that support it, and CPUs with
    AVX512-BF16 or AMX. Elsewhere bf16 would be emulated, slower than fp32, so it stays off.
    On a 2-core AVX512-BF16 CPU, autocast trained the baseline and MaxMin nets 2.1x faster per
    step (bench/train_bench.py, BENCHMARKS.md)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        try:
            return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
        except RuntimeError:
            return False
    return False


def precision(device: torch.device, amp: bool) -> str:
    """The arithmetic training uses on ``device``: 'bf16 autocast' or 'fp32'."""
    return "bf16 autocast" if amp and bf16_native(device.type) else "fp32"


def _autocast(device: torch.device, amp: bool):  # noqa: ANN202
    enabled = amp and bf16_native(device.type)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    gen: torch.Generator,
) -> float:
    """One pass over the training images in a seeded order; returns the mean training loss."""
    model.train()
    device = images.device
    order = torch.randperm(len(images), generator=gen).to(device)
    total, seen = torch.zeros((), device=device), 0
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        if len(idx) < 2:  # a single-image batch adds noise and nothing else
            continue
        x = augment(normalize(images[idx], mean, std), cfg.augment, gen)
        y = labels[idx]
        with _autocast(device, cfg.amp):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach().float() * len(idx)
        seen += len(idx)
    return float(total) / max(seen, 1)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int = 256,
    amp: bool = True,
) -> torch.Tensor:
    """Class probabilities for every image (N x K, float32, on the CPU)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size], mean, std)
        with _autocast(images.device, amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def fit(
    arch: str,
    model_kwargs: dict,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    mean: torch.Tensor,
    std: torch.Tensor,
    seed: int,
    cfg: TrainConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> RunResult:
    """Train ``arch`` with ``seed``; keep the weights of the best validation epoch."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    torch.manual_seed(seed)
    model = create_model(arch, **model_kwargs).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = data["train"]
    val_x, val_y = data["val"]
    test_x, _ = data["test"]
    num_classes = model_kwargs["num_classes"]
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(train_y.cpu(), num_classes).to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, sum(1 for s in range(0, len(train_x), cfg.batch_size)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch + 1, pct_start=0.15
    )
    train_loss: list[float] = []
    val_acc: list[float] = []
    best_acc, best_epoch, best_state = -1.0, 0, None
    diverged = None
    val_labels = val_y.cpu()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        for epoch in range(cfg.epochs):
            loss = train_one_epoch(
                model, optimizer, scheduler, train_x, train_y, mean, std, loss_fn, cfg, gen
            )
            acc = float(
                (evaluate(model, val_x, mean, std, amp=cfg.amp).argmax(1) == val_labels)
                .float()
                .mean()
            )
            train_loss.append(loss)
            val_acc.append(acc)
            if on_epoch is not None:
                on_epoch(epoch, loss, acc)
            if not math.isfinite(loss):
                diverged = f"training loss became {loss} at epoch {epoch + 1}"
                break
            if acc > best_acc:
                best_acc, best_epoch = acc, epoch + 1
                best_state = copy.deepcopy(model.state_dict())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    majority = float(torch.bincount(val_labels, minlength=num_classes).max()) / max(
        len(val_labels), 1
    )
    if (
        diverged is None
        and train_loss
        and train_loss[-1] >= 0.95 * math.log(num_classes)
        and best_acc <= majority + 0.01
    ):
        diverged = (
            f"stuck at chance level: training loss {train_loss[-1]:.3f} vs "
            f"ln({num_classes}) = {math.log(num_classes):.3f}, best validation accuracy "
            f"{best_acc:.3f} vs {majority:.3f} for always guessing the largest class"
        )
    if best_state is not None:
        model.load_state_dict(best_state)
    # The test set is scored in fp32, as the service runs the models.
    prob = evaluate(model, test_x, mean, std, amp=False)
    state = {
        k: v.detach().to("cpu", memory_format=torch.contiguous_format).clone()
        for k, v in model.state_dict().items()
    }
    return RunResult(
        arch=arch,
        seed=seed,
        state_dict=state,
        train_loss=train_loss,
        val_accuracy=val_acc,
        best_epoch=best_epoch,
        test_pred=prob.argmax(1).numpy(),
        test_prob=prob.numpy(),
        train_seconds=seconds,
        peak_memory_bytes=mem.peak,
        diverged=diverged,
        extra={"memory_method": mem.method},
    )
