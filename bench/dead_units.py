"""Why a model sits at chance: its hidden layer's dead units, with and without normalization.

Trains one model on a data folder with the trainer's engine (one seed, fixed recipe), then counts
the hidden layer's units that are zero for every one of 400 training images. Prints the validation
macro F1 of each epoch and that count, for each setting asked for, side by side:

    python bench/dead_units.py data/stress --arch maxmin --norm none batch --epochs 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from inspectlib.preprocess import normalize
from models import create_model
from training.data import load_dataset
from training.engine import TrainConfig, fit


def dead_fraction(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The share of hidden units (after the hidden layer's ReLU) that no image switches on."""
    model.eval()
    head = model.classifier
    relu = next(i for i, m in enumerate(head) if isinstance(m, torch.nn.ReLU))
    with torch.no_grad():
        h = head[: relu + 1](model.features(x))
    return float(((h > 0).sum(0) == 0).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("--arch", default="maxmin")
    p.add_argument("--norm", nargs="+", default=["none", "batch"])
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--class-weights", default="none")
    p.add_argument("--augment", default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    ds = load_dataset(args.data, size=args.size, progress=False)
    splits, mean, std = ds.resident(torch.device("cpu"))
    augment = tuple(a for a in args.augment.split(",") if a and a != "none")
    results = []
    for norm in args.norm:
        kwargs = {
            "num_classes": len(ds.classes),
            "in_channels": ds.channels,
            "image_size": ds.size,
            "norm": norm,
        }
        cfg = TrainConfig(
            epochs=args.epochs,
            optimizer=args.optimizer,
            lr=args.lr,
            class_weighting=args.class_weights,
            augment=augment,
            select_metric="macro_f1",
            amp=False,
        )
        r = fit(args.arch, kwargs, splits, mean, std, args.seed, cfg)
        model = create_model(args.arch, **kwargs)
        model.load_state_dict(r.state_dict)
        x = normalize(splits["train"][0][:400], mean, std)
        row = {
            "arch": args.arch,
            "norm": norm,
            "val_macro_f1": [round(v, 3) for v in r.val_metric],
            "best_val_macro_f1": round(max(r.val_metric), 3),
            "dead_hidden_units": round(dead_fraction(model, x), 3),
            "failed": r.diverged,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(
            json.dumps(
                {"args": vars(args) | {"data": str(args.data)}, "runs": results},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
