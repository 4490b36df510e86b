"""One part of the trainer's default recipe at a time, added to the plain loop's recipe, on the
trainer's own ``fit``, split, seeds and models: which part moves test macro F1.

The starting recipe is the plain loop's of bench/fidelity.py (SGD-Nesterov, one-cycle to 0.05,
batch 64, no class weights, no augmentation); each row adds one default of the trainer.

    python bench/recipe_ablation.py ../shared/datasets/elpv --arch baseline --seeds 0 1 2 \
        --out bench/results/recipe-elpv-baseline.json
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
from training.poc import PocConfig, _model_kwargs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--arch", default="baseline")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    ds = load_dataset(args.data, size=args.size, progress=False)
    splits, mean, std = ds.resident(torch.device("cpu"))
    kwargs = _model_kwargs(ds, "batch")
    k = kwargs["num_classes"]
    y = splits["test"][1].numpy()
    default = PocConfig(data=str(args.data), out="-").train
    plain = replace(
        default,
        optimizer="sgd",
        lr=0.05,
        batch_size=64,
        augment=(),
        class_weighting="none",
        select_metric="macro_f1",
    )
    rows = {
        "the plain loop's recipe": plain,
        "+ the trainer's augmentation": replace(plain, augment=default.augment),
        "+ the trainer's class weights": replace(plain, class_weighting=default.class_weighting),
        "+ the trainer's batch size": replace(plain, batch_size=default.batch_size),
        "+ AdamW at 3e-4 (a recipe the search can choose)": replace(
            plain, optimizer="adamw", lr=3e-4
        ),
    }
    results: dict = {"data": str(args.data), "arch": args.arch, "rows": {}}
    for name, cfg in rows.items():
        f1s = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            run = engine.fit(args.arch, kwargs, splits, mean, std, seed, replace(cfg))
            f1s.append(engine.macro_f1(y, run.test_pred, k))
            print(
                f"{name}, seed {seed}: macro F1 {f1s[-1] * 100:.1f}% "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        sd = float(np.std(f1s, ddof=1)) if len(f1s) > 1 else 0.0
        results["rows"][name] = {"recipe": vars(cfg), "macro_f1": f1s, "sd": sd}
        print(f"{name}: macro F1 {np.mean(f1s) * 100:.1f} ± {sd * 100:.1f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=list))


if __name__ == "__main__":
    main()
