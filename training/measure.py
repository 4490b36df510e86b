"""Cost of a model: parameters, FLOPs per image, inference latency and throughput."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, channels: int, size: int) -> int:
    """Floating-point operations of one forward pass on one image (a multiply-add counts as 2)."""
    model = model.eval()
    x = torch.zeros(1, channels, size, size, device=next(model.parameters()).device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    channels: int,
    size: int,
    device: torch.device,
    iters: int = 100,
    budget_s: float = 3.0,
) -> dict[str, float]:
    """Batch-1 latency (p50, p99, ms) and batch-64 throughput (images/s), after a warm-up.

    Bounded by ``budget_s`` per measurement so that a slow machine still finishes.
    """
    model = model.eval().to(device)
    one = torch.randn(1, channels, size, size, device=device)
    for _ in range(5):
        model(one)
    _sync(device)
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < iters and (len(times) < 10 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        model(one)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    batch = torch.randn(64, channels, size, size, device=device)
    model(batch)
    _sync(device)
    rounds, t0 = 0, time.perf_counter()
    while rounds < 3 or (time.perf_counter() - t0 < budget_s / 2 and rounds < 50):
        model(batch)
        _sync(device)
        rounds += 1
    elapsed = time.perf_counter() - t0
    arr = np.asarray(times)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 4),
        "p99_ms": round(float(np.percentile(arr, 99)), 4),
        "samples": len(times),
        "throughput_images_per_s": round(64 * rounds / elapsed, 1),
    }
