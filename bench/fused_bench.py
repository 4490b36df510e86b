"""Fused MaxMin + max pooling against the naive concat -> ReLU -> pool, side by side in one run.

Times forward + backward of the block on conv-output-shaped tensors, alternating the two forms, and
reports medians and the ratio. Usage: python bench/fused_bench.py [--device cpu|cuda] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from models.layers import MaxMinPool

# Conv outputs of the MaxMin net at 64 px, batch 32: (channels, side) of each of its 3 blocks.
SHAPES = [(32, 64), (32, 32), (64, 16)]


def _time(block: torch.nn.Module, x: torch.Tensor, device: torch.device, iters: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        block(x).sum().backward()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        block(x).sum().backward()
    sync()
    return (time.perf_counter() - t0) / iters * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = []
    for channels, side in SHAPES:
        x = torch.randn(args.batch, channels, side, side, device=device, requires_grad=True)
        naive, fused = MaxMinPool(fused=False), MaxMinPool(fused=True)
        assert torch.equal(naive(x), fused(x))
        times = {"naive": [], "fused": []}
        for r in range(args.repeats):
            order = (
                (("naive", naive), ("fused", fused))
                if r % 2 == 0
                else (("fused", fused), ("naive", naive))
            )
            for name, block in order:
                times[name].append(_time(block, x, device, args.iters))
        n, f = statistics.median(times["naive"]), statistics.median(times["fused"])
        results.append(
            {
                "shape": [args.batch, channels, side, side],
                "naive_ms": round(n, 4),
                "fused_ms": round(f, 4),
                "speedup": round(n / f, 2),
            }
        )
    print(
        json.dumps(
            {
                "device": str(device),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
