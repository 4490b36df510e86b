"""How the layers' starting scale moves a batch-normalized model: He's against PyTorch's, side by
side, on the same split, seeds and batches.

The trainer's own ``fit`` with one fixed recipe (by default the plain loop's of bench/fidelity.py:
SGD-Nesterov, one-cycle to 0.05, batch 64, no class weights, no augmentation), once with the
models as they are built (PyTorch's initialization under batch norm) and once with He
initialization applied on top; prints test macro F1 and accuracy per seed, and writes JSON.

    python bench/init_diag.py ../shared/datasets/elpv --arch baseline --seeds 0 1 2 \
        --out bench/results/init-elpv.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import engine  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.poc import _model_kwargs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--arch", default="baseline")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=engine.TrainConfig.epochs)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    ds = load_dataset(args.data, size=args.size, progress=False)
    splits, mean, std = ds.resident(torch.device("cpu"))
    kwargs = _model_kwargs(ds, "batch")
    k = kwargs["num_classes"]
    y = splits["test"][1].numpy()
    cfg = engine.TrainConfig(
        optimizer="sgd",
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        augment=(),
        class_weighting="none",
        select_metric="macro_f1",
    )
    build = engine.create_model

    def with_he(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        model = build(*a, **kw)
        model._init_weights(maxmin=a[0].startswith("maxmin"))
        return model

    results: dict = {"data": str(args.data), "arch": args.arch, "recipe": vars(cfg), "runs": {}}
    for init, maker in (("torch", build), ("he", with_he)):
        engine.create_model = maker
        rows = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            run = engine.fit(args.arch, kwargs, splits, mean, std, seed, replace(cfg))
            f1 = engine.macro_f1(y, run.test_pred, k)
            acc = float(np.mean(run.test_pred == y))
            rows.append({"seed": seed, "macro_f1": f1, "accuracy": acc})
            print(
                f"{init:>5} init seed {seed}: macro F1 {f1 * 100:.1f}%, accuracy {acc * 100:.1f}% "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        results["runs"][init] = rows
        f1s = [r["macro_f1"] for r in rows]
        sd = np.std(f1s, ddof=1) * 100 if len(f1s) > 1 else 0.0
        print(f"{init:>5} init: macro F1 {np.mean(f1s) * 100:.1f} ± {sd:.1f} over {len(f1s)}")
    engine.create_model = build
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
