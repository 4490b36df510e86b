"""This project's trainer against the plain PyTorch way, side by side, same models, data and budget.

The plain way: torchvision ImageFolder + DataLoader (default settings) decoding every image each
epoch, an eager fp32 loop, default torch threads. This trainer: decode once into one uint8 tensor,
batches sliced from it on the device, channels_last on the CPU, bf16 autocast where the hardware
computes in bf16, and on CUDA each training step replayed as one captured CUDA graph (the side
``ours-eager`` is the same trainer with eager steps, to show what the graphs bring).

Both train every model for the same epochs and batch size on the same training images, evaluating
the same validation images after each epoch; each repeat runs each side in a fresh process (so peak
memory is its own), alternating which goes first. Reported: images/s per model, the whole PoC-shaped
run's wall time (decoding included), peak memory, and the final validation accuracy so that speed
is never bought with accuracy. Medians over repeats.

Usage: python bench/train_bench.py DATA [--size 64] [--epochs 3] [--repeats 3] [--device cpu]
       [--sides plain,ours,ours-eager]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = ("baseline", "maxmin", "maxmin_half")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_plain(args: argparse.Namespace) -> dict:
    """ImageFolder + DataLoader, per-epoch decoding, eager fp32."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from models import create_model
    from training.data import load_dataset

    device = torch.device(args.device)
    t_start = time.perf_counter()
    # The same split as the trainer's, mapped onto ImageFolder's file order (no decoding here:
    # the split only needs names, and the trainer's cache is not used by this side).
    split = load_dataset(Path(args.data), size=args.size, progress=False, cache_dir=None)
    ds_probe = datasets.ImageFolder(args.data)
    pos = {str(Path(p).resolve()): i for i, (p, _) in enumerate(ds_probe.samples)}
    train_idx = [pos[str(Path(split.paths[i]).resolve())] for i in split.indices("train")]
    val_idx = [pos[str(Path(split.paths[i]).resolve())] for i in split.indices("val")]
    split_seconds = time.perf_counter() - t_start
    grey = [transforms.Grayscale(1)] if split.channels == 1 else []
    norm = transforms.Normalize(split.mean, split.std)
    train_tf = transforms.Compose(
        [
            *grey,
            transforms.Resize((args.size, args.size)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            norm,
        ]
    )
    val_tf = transforms.Compose(
        [*grey, transforms.Resize((args.size, args.size)), transforms.ToTensor(), norm]
    )
    train_ds = Subset(datasets.ImageFolder(args.data, transform=train_tf), train_idx)
    val_ds = Subset(datasets.ImageFolder(args.data, transform=val_tf), val_idx)
    kwargs = {
        "num_classes": len(split.classes),
        "in_channels": split.channels,
        "image_size": args.size,
    }
    out = {}
    for arch in args.models:
        torch.manual_seed(0)
        model = create_model(arch, **kwargs).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
        loss_fn = torch.nn.CrossEntropyLoss()
        loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True)
        val_loader = DataLoader(val_ds, batch_size=256)
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            model.train()
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for x, y in val_loader:
                    correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out[arch] = {
            "seconds": seconds,
            "images_per_s": len(train_idx) * args.epochs / seconds,
            "val_accuracy": correct / len(val_idx),
        }
    total = time.perf_counter() - t_start - split_seconds
    return {
        "models": out,
        "precision": "fp32",
        "total_seconds": total,
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


def run_ours(args: argparse.Namespace, cuda_graphs: bool = True) -> dict:
    """This project's trainer: decode once, resident tensor, the engine's fit()."""
    from training.data import load_dataset
    from training.engine import TrainConfig, fit, precision

    device = torch.device(args.device)
    t_start = time.perf_counter()
    ds = load_dataset(Path(args.data), size=args.size, progress=False, cache_dir=None)
    splits, mean, std = ds.resident(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    data_seconds = time.perf_counter() - t_start  # decoding, and the data onto the device
    kwargs = {"num_classes": len(ds.classes), "in_channels": ds.channels, "image_size": args.size}
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        augment=("hflip",),
        device=str(device),
        amp=args.precision == "auto",
        cuda_graphs=cuda_graphs,
    )
    out = {}
    steps = set()
    n_train = len(ds.indices("train"))
    for arch in args.models:
        t0 = time.perf_counter()
        res = fit(arch, kwargs, splits, mean, std, 0, cfg)
        out[arch] = {
            "seconds": res.train_seconds,
            # the rest of fit(): the final test pass in fp32 and the weights back to the host
            "after_training_seconds": time.perf_counter() - t0 - res.train_seconds,
            "images_per_s": n_train * args.epochs / res.train_seconds,
            "val_accuracy": res.val_accuracy[-1],
        }
        steps.add(res.extra["training_step"])
    total = time.perf_counter() - t_start
    return {
        "models": out,
        "precision": precision(device, cfg.amp),
        "training_step": sorted(steps),
        "total_seconds": total,
        "data_seconds": data_seconds,
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32"],
        default="auto",
        help="this trainer's arithmetic, as `maxmin-inspect train --precision` (the plain loop "
        "is always fp32)",
    )
    parser.add_argument(
        "--sides",
        default="plain,ours",
        help="what to compare: plain, ours, and on CUDA ours-eager (this trainer without CUDA "
        "graphs, to show what the graphs bring)",
    )
    parser.add_argument("--impl", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    if args.impl:  # a child process: one side, one repeat
        print(json.dumps(SIDES[args.impl](args)))
        return
    sides = [s for s in args.sides.split(",") if s]
    if not {"plain", "ours"} <= set(sides) or not set(sides) <= set(SIDES):
        sys.exit(f"--sides must include plain and ours, from {', '.join(SIDES)}")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    base = [
        sys.executable,
        __file__,
        args.data,
        "--size",
        str(args.size),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--models",
        ",".join(args.models),
        "--precision",
        args.precision,
    ]
    for r in range(args.repeats):
        for impl in sides if r % 2 == 0 else sides[::-1]:
            proc = subprocess.run(
                [*base, "--impl", impl],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
            )
            if proc.returncode:
                sys.exit(f"{impl} failed:\n{proc.stderr[-3000:]}")
            runs[impl].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(
                f"repeat {r + 1} {impl}: {runs[impl][-1]['total_seconds']:.1f} s", file=sys.stderr
            )

    def med(values: list[float]) -> float:
        return statistics.median(values)

    summary = {
        "device": args.device,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "size": args.size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "models": {},
    }
    for arch in args.models:
        row = {}
        for impl in sides:
            row[f"{impl}_images_per_s"] = round(
                med([x["models"][arch]["images_per_s"] for x in runs[impl]]), 1
            )
            row[f"{impl}_val_accuracy"] = round(
                med([x["models"][arch]["val_accuracy"] for x in runs[impl]]), 4
            )
        row["speedup"] = round(row["ours_images_per_s"] / row["plain_images_per_s"], 2)
        if "ours-eager" in sides:
            row["cuda_graph_speedup"] = round(
                row["ours_images_per_s"] / row["ours-eager_images_per_s"], 2
            )
        summary["models"][arch] = row
    for impl in sides:
        summary[f"{impl}_total_seconds"] = round(med([x["total_seconds"] for x in runs[impl]]), 2)
        summary[f"{impl}_peak_rss_mb"] = round(
            med([x["peak_rss_bytes"] for x in runs[impl]]) / 1e6, 1
        )
        if args.device.startswith("cuda"):
            summary[f"{impl}_peak_cuda_mb"] = round(
                med([x["peak_cuda_bytes"] for x in runs[impl]]) / 1e6, 1
            )
    summary["end_to_end_speedup"] = round(
        summary["plain_total_seconds"] / summary["ours_total_seconds"], 2
    )
    summary["ours_precision"] = runs["ours"][0]["precision"]
    summary["ours_training_step"] = runs["ours"][0]["training_step"]
    # This trainer's time outside its training loops: fixed costs that do not grow with epochs.
    summary["ours_split_seconds"] = {
        "data": round(med([x["data_seconds"] for x in runs["ours"]]), 2),
        **{
            f"{arch}_{part}": round(med([x["models"][arch][key] for x in runs["ours"]]), 2)
            for arch in args.models
            for part, key in (("training", "seconds"), ("after_training", "after_training_seconds"))
        },
    }
    summary["per_repeat_seconds"] = {
        impl: [round(x["total_seconds"], 2) for x in runs[impl]] for impl in runs
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


SIDES = {
    "plain": run_plain,
    "ours": run_ours,
    "ours-eager": lambda args: run_ours(args, cuda_graphs=False),
}

if __name__ == "__main__":
    main()
