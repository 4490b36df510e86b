"""Shared by bench/init_diag.py and bench/recipe_ablation.py: the trainer's own ``fit`` run under
several variants on one dataset's split, the same seeds for each, test macro F1 and accuracy per
seed, printed and written as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspectlib.stats import paired_bootstrap  # noqa: E402
from training import engine  # noqa: E402
from training.data import load_dataset  # noqa: E402
from training.poc import _model_kwargs  # noqa: E402

# A variant: the recipe, and the model builder to use (None: the trainer's own).
Variant = tuple[engine.TrainConfig, Callable[..., torch.nn.Module] | None]


def parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every such comparison takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--arch", default="baseline")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--only", nargs="+", default=None, help="run only the variants named (prefix)")
    return p


def compare(args: argparse.Namespace, variants: dict[str, Variant]) -> dict:
    """Train ``args.arch`` under each variant with every seed; returns (and writes) the scores."""
    ds = load_dataset(args.data, size=args.size, progress=False)
    splits, mean, std = ds.resident(torch.device("cpu"))
    kwargs = _model_kwargs(ds, "batch")
    k = kwargs["num_classes"]
    y = splits["test"][1].numpy()
    val_y = splits["val"][1].numpy()
    build = engine.create_model
    results: dict = {"data": str(args.data), "arch": args.arch, "variants": {}}
    try:
        for name, (cfg, maker) in variants.items():
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            engine.create_model = maker or build
            rows = []
            for seed in args.seeds:
                t0 = time.perf_counter()
                training = engine.Training(args.arch, kwargs, splits, mean, std, seed, replace(cfg))
                training.advance()
                # The last epoch's weights too, as a plain loop keeps them: what choosing the best
                # validation epoch adds or costs on the test images.
                last_probs = engine.evaluate(
                    training.model, splits["test"][0], mean, std, amp=False
                )
                last_f1 = engine.macro_f1(y, last_probs.argmax(1).numpy(), k)
                run = training.finish()
                f1 = engine.macro_f1(y, run.test_pred, k)
                acc = float(np.mean(run.test_pred == y))
                val = max(run.val_metric) if run.val_metric else None
                # The kept weights' mean log-loss on validation: a continuous score, where macro F1
                # on a class of a few validation images moves in steps.
                nll = None
                if run.val_prob is not None:
                    p_true = np.asarray(run.val_prob)[np.arange(len(val_y)), val_y]
                    nll = float(-np.mean(np.log(np.clip(p_true, 1e-12, 1.0))))
                rows.append(
                    {
                        "seed": seed,
                        "macro_f1": f1,
                        "macro_f1_last_epoch": last_f1,
                        "best_epoch": run.best_epoch,
                        "accuracy": acc,
                        "val": val,
                        "val_nll": nll,
                        "test_pred": np.asarray(run.test_pred).tolist(),
                    }
                )
                print(
                    f"{name}, seed {seed}: macro F1 {f1 * 100:.1f}% (epoch {run.best_epoch}; "
                    f"the last epoch's {last_f1 * 100:.1f}%), accuracy {acc * 100:.1f}%, "
                    f"best validation {cfg.select_metric} {(val or 0) * 100:.1f}%, "
                    f"its log-loss {nll if nll is not None else float('nan'):.3f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
            f1s = [r["macro_f1"] for r in rows]
            sd = float(np.std(f1s, ddof=1)) if len(f1s) > 1 else 0.0
            entry = {"recipe": vars(cfg), "runs": rows, "macro_f1_sd": sd}
            first = next(iter(results["variants"].values()), None)
            lasts = [r["macro_f1_last_epoch"] for r in rows]
            line = (
                f"{name}: macro F1 {np.mean(f1s) * 100:.1f} ± {sd * 100:.1f} over {len(f1s)} "
                f"(last epochs' {np.mean(lasts) * 100:.1f})"
            )
            if first is not None:
                # Against the first variant run, on the same test images: is the difference more
                # than the finite test set and the seeds can produce by chance?
                diff = paired_bootstrap(
                    "macro_f1",
                    y,
                    [np.asarray(r["test_pred"]) for r in rows],
                    [np.asarray(r["test_pred"]) for r in first["runs"]],
                    k,
                )
                entry["difference_to_first"] = {key: diff[key] for key in ("mean", "low", "high")}
                line += (
                    f"; against the first variant {diff['mean'] * 100:+.1f} points "
                    f"(95 % paired bootstrap {diff['low'] * 100:+.1f} to {diff['high'] * 100:+.1f})"
                )
            results["variants"][name] = entry
            print(line, flush=True)
    finally:
        engine.create_model = build
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=list))
    return results
