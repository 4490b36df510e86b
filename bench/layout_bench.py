"""CPU inference: channels-last against the default layout, same models, side by side in one run.

Usage: python bench/layout_bench.py [--size 64] [--seconds 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from models import create_model


def _ms_per_image(model: torch.nn.Module, x: torch.Tensor, seconds: float) -> float:
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += 1
        return (time.perf_counter() - t0) / n / len(x) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for arch in ("baseline", "maxmin"):
        for batch in (1, 16):
            model = create_model(arch, num_classes=6, in_channels=1, image_size=args.size).eval()
            x = torch.randn(batch, 1, args.size, args.size)
            last = model.to(memory_format=torch.channels_last)
            times = {"default": [], "channels_last": []}
            for _ in range(args.repeats):  # alternate, so both sides see the same machine
                model = model.to(memory_format=torch.contiguous_format)
                times["default"].append(_ms_per_image(model, x, args.seconds))
                last = model.to(memory_format=torch.channels_last)
                xl = x.contiguous(memory_format=torch.channels_last)
                times["channels_last"].append(_ms_per_image(last, xl, args.seconds))
            d, c = statistics.median(times["default"]), statistics.median(times["channels_last"])
            rows.append(
                {
                    "model": arch,
                    "batch": batch,
                    "default_ms_per_image": round(d, 3),
                    "channels_last_ms_per_image": round(c, 3),
                    "speedup": round(d / c, 2),
                }
            )
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "size": args.size,
                "results": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
