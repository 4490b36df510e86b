"""The PoC run: train every model under identical conditions and write the comparison report."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from tqdm.auto import tqdm

from models import create_model, list_models
from training.checkpoint import save_checkpoint
from training.data import Dataset, load_dataset
from training.engine import RunResult, TrainConfig, fit, precision, resolve_device
from training.measure import count_flops, count_params, measure_latency
from training.report import write_html
from training.stats import mcnemar, mean_std, paired_difference_ci

REPORT_VERSION = 1
BASELINE = "baseline"


@dataclass
class PocConfig:
    """Everything a PoC run depends on; stored in the report so the run can be repeated."""

    data: str
    out: str
    models: list[str] = field(default_factory=lambda: ["baseline", "maxmin", "maxmin_half"])
    size: int = 64
    channels: str = "auto"
    seeds: int = 3
    split_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    device: str = "auto"
    cache_dir: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    latency_budget_s: float = 1.0
    progress: bool = True


def _model_kwargs(ds: Dataset) -> dict[str, int]:
    return {"num_classes": len(ds.classes), "in_channels": ds.channels, "image_size": ds.size}


def run_poc(cfg: PocConfig, on_progress: Callable[..., None] | None = None) -> Path:
    """Train, evaluate and measure each model for each seed; write checkpoints and the report.

    ``on_progress(**fields)`` hears each stage (``state``: decoding, training, reporting) and,
    while training, each epoch: epochs done and in all, the model and seed, seconds left."""
    progress = on_progress or (lambda **_: None)
    for name in cfg.models:
        if name not in list_models():
            raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    device = resolve_device(cfg.device)
    cfg.train.device = str(device)
    started = time.perf_counter()
    out = Path(cfg.out)
    t0 = time.perf_counter()
    progress(state="decoding")
    ds = load_dataset(
        Path(cfg.data),
        size=cfg.size,
        channels=cfg.channels,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        split_seed=cfg.split_seed,
        cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
        progress=cfg.progress,
    )
    data_seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)  # only once the data is usable: no empty run folders
    splits, mean, std = ds.resident(device)
    test_y = ds.labels[torch.as_tensor(ds.indices("test"))].numpy()
    kwargs = _model_kwargs(ds)
    results: dict[str, list[RunResult]] = {m: [] for m in cfg.models}
    seeds = list(range(cfg.seeds))
    total = len(seeds) * len(cfg.models) * cfg.train.epochs
    progress(state="training", epochs_done=0, epochs_total=total)
    train_start = time.perf_counter()
    done = 0  # epochs counted here: a disabled progress bar counts nothing
    with tqdm(total=total, desc="training", unit="epoch", disable=not cfg.progress) as bar:

        def report_epochs(arch: str, seed: int, detail: str) -> None:
            spent = time.perf_counter() - train_start
            left = spent / done * (total - done) if done else None
            progress(
                epochs_done=done,
                model=arch,
                seed=seed,
                detail=detail,
                eta_seconds=round(left, 1) if left is not None else None,
            )

        for seed in seeds:
            for arch in cfg.models:

                def on_epoch(
                    epoch: int, loss: float, acc: float, arch: str = arch, seed: int = seed
                ) -> None:
                    nonlocal done
                    detail = f"{arch} seed {seed} loss {loss:.3f} val {acc:.3f}"
                    bar.set_postfix_str(detail)
                    bar.update(1)
                    done += 1
                    report_epochs(arch, seed, detail)

                res = fit(arch, kwargs, splits, mean, std, seed, cfg.train, on_epoch=on_epoch)
                bar.update(cfg.train.epochs - len(res.train_loss))  # a run stopped early
                done += cfg.train.epochs - len(res.train_loss)
                results[arch].append(res)
    progress(state="reporting", epochs_done=total, eta_seconds=None)
    meta_common = {
        "model_kwargs": kwargs,
        "classes": ds.classes,
        "image_size": ds.size,
        "channels": ds.channels,
        "normalization": {"mean": ds.mean, "std": ds.std},
        "data_fingerprint": ds.fingerprint,
        "resize": "bilinear, whole image squashed to a square",
    }
    models_report: dict[str, Any] = {}
    for arch, runs in results.items():
        models_report[arch] = _model_section(
            arch, runs, ds, test_y, meta_common, out, device, cfg.latency_budget_s
        )
    comparison = _comparison(results, models_report, test_y)
    report = {
        "report_version": REPORT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": {
            "config": {
                **asdict(cfg),
                "train": {**asdict(cfg.train), "augment": list(cfg.train.augment)},
            },
            "device": str(device),
            "precision": precision(device, cfg.train.amp),
            "training_step": sorted(
                {r.extra.get("training_step", "eager") for rs in results.values() for r in rs}
            ),
            "training_step_fallbacks": sorted(
                {r.extra.get("step_fallback") for rs in results.values() for r in rs} - {None}
            ),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "data_seconds": round(data_seconds, 3),
            "data_from_cache": ds.from_cache,
            "wall_seconds": None,
        },
        "dataset": {
            "source": str(cfg.data),
            "classes": ds.classes,
            "channels": ds.channels,
            "size": ds.size,
            "counts": ds.counts(),
            "image_sizes": ds.image_sizes,
            "skipped": ds.skipped,
            "duplicates": ds.duplicates,
            "fingerprint": ds.fingerprint,
            "normalization": {"mean": ds.mean, "std": ds.std},
        },
        "models": models_report,
        "comparison": comparison,
        "verdict": verdict(models_report, comparison),
    }
    report["run"]["wall_seconds"] = round(time.perf_counter() - started, 3)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_html(report, out / "report.html")
    return out


def _model_section(
    arch: str,
    runs: list[RunResult],
    ds: Dataset,
    test_y: np.ndarray,
    meta_common: dict,
    out: Path,
    device: torch.device,
    latency_budget_s: float,
) -> dict[str, Any]:
    k = len(ds.classes)
    labels = list(range(k))
    per_seed_acc, per_seed_f1, checkpoints = [], [], []
    cm_total = np.zeros((k, k), dtype=np.int64)
    valid = [r for r in runs if r.diverged is None]
    for r in runs:
        acc = float(np.mean(r.test_pred == test_y))
        f1 = float(f1_score(test_y, r.test_pred, labels=labels, average="macro", zero_division=0))
        meta = {
            **meta_common,
            "arch": arch,
            "seed": r.seed,
            "metrics": {
                "test_accuracy": acc,
                "test_macro_f1": f1,
                "best_val_accuracy": max(r.val_accuracy) if r.val_accuracy else None,
                "best_epoch": r.best_epoch,
            },
            "diverged": r.diverged,
        }
        written = save_checkpoint(r.state_dict, meta, out / "checkpoints" / f"{arch}-seed{r.seed}")
        checkpoints.append(
            {
                "seed": r.seed,
                "path": f"checkpoints/{arch}-seed{r.seed}",
                "weights_sha256": written["weights_sha256"],
                "best_val_accuracy": meta["metrics"]["best_val_accuracy"],
                "diverged": r.diverged,
            }
        )
        per_seed_acc.append(acc)
        per_seed_f1.append(f1)
        if r.diverged is None:
            cm_total += confusion_matrix(test_y, r.test_pred, labels=labels)
    ok_acc = [a for a, r in zip(per_seed_acc, runs, strict=True) if r.diverged is None]
    ok_f1 = [f for f, r in zip(per_seed_f1, runs, strict=True) if r.diverged is None]
    # Per-class figures from the confusion matrix summed over the seeds that trained properly.
    y_true = np.repeat(np.arange(k), cm_total.sum(1))
    y_pred = np.concatenate([np.repeat(np.arange(k), row) for row in cm_total]) if valid else []
    per_class = {}
    if valid:
        p, rc, f, support = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0
        )
        per_class = {
            name: {
                "precision": float(p[i]),
                "recall": float(rc[i]),
                "f1": float(f[i]),
                "support": int(support[i]) // len(valid),
            }
            for i, name in enumerate(ds.classes)
        }
    deploy = max(
        (c for c in checkpoints if not c["diverged"]),
        key=lambda c: c["best_val_accuracy"] or 0.0,
        default=None,
    )
    model = create_model(arch, **meta_common["model_kwargs"])
    latency = {
        str(device): measure_latency(model, ds.channels, ds.size, device, budget_s=latency_budget_s)
    }
    if device.type != "cpu":
        latency["cpu"] = measure_latency(
            model, ds.channels, ds.size, torch.device("cpu"), budget_s=latency_budget_s
        )
    main_latency = latency[str(device)]
    return {
        "arch": arch,
        "model_kwargs": meta_common["model_kwargs"],
        "params": count_params(model),
        "flops": count_flops(model.cpu(), ds.channels, ds.size),
        "weights_bytes": int((out / f"{checkpoints[0]['path']}.safetensors").stat().st_size),
        "train_seconds": {
            **mean_std([r.train_seconds for r in runs]),
            "per_seed": [round(r.train_seconds, 3) for r in runs],
            "total": round(sum(r.train_seconds for r in runs), 3),
        },
        "peak_memory_bytes": max(r.peak_memory_bytes for r in runs),
        "peak_memory_method": runs[0].extra.get("memory_method"),
        "accuracy": {**mean_std(ok_acc), "per_seed": per_seed_acc},
        "macro_f1": {**mean_std(ok_f1), "per_seed": per_seed_f1},
        "diverged": [{"seed": r.seed, "reason": r.diverged} for r in runs if r.diverged],
        "per_class": per_class,
        "confusion_matrix": cm_total.tolist(),
        "confusion_matrix_note": f"test set, summed over {len(valid)} seed(s)",
        "curves": [
            {
                "seed": r.seed,
                "train_loss": [round(v, 5) for v in r.train_loss],
                "val_accuracy": [round(v, 5) for v in r.val_accuracy],
                "best_epoch": r.best_epoch,
            }
            for r in runs
        ],
        "latency_ms": {
            d: {"p50": v["p50_ms"], "p99": v["p99_ms"], "samples": v["samples"]}
            for d, v in latency.items()
        },
        "throughput": {d: v["throughput_images_per_s"] for d, v in latency.items()},
        "latency_device": str(device),
        "latency_p50_ms": main_latency["p50_ms"],
        "checkpoints": checkpoints,
        "checkpoint": deploy["path"] if deploy else None,
        "_test_pred": {r.seed: r.test_pred.tolist() for r in runs if r.diverged is None},
    }


def _comparison(
    results: dict[str, list[RunResult]], models: dict[str, Any], test_y: np.ndarray
) -> dict[str, Any]:
    """Each model against the baseline: paired interval over seeds, McNemar, cost ratios."""
    preds = {name: m.pop("_test_pred") for name, m in models.items()}
    if BASELINE not in models:
        return {}
    base = models[BASELINE]
    out: dict[str, Any] = {}
    for name, m in models.items():
        if name == BASELINE:
            continue
        seeds = sorted(set(preds[name]) & set(preds[BASELINE]))
        acc_m = [float(np.mean(np.asarray(preds[name][s]) == test_y)) for s in seeds]
        acc_b = [float(np.mean(np.asarray(preds[BASELINE][s]) == test_y)) for s in seeds]
        tests = []
        for s in seeds:
            t = mcnemar(
                np.asarray(preds[name][s]) == test_y, np.asarray(preds[BASELINE][s]) == test_y
            )
            tests.append({"seed": s, **t})
        out[name] = {
            "accuracy_difference": paired_difference_ci(acc_m, acc_b),
            "mcnemar": tests,
            "mcnemar_significant_seeds": sum(t["p_value"] < 0.05 for t in tests),
            "params_ratio": m["params"] / base["params"],
            "flops_ratio": m["flops"] / base["flops"],
            "latency_ratio": m["latency_p50_ms"] / base["latency_p50_ms"],
            "train_time_ratio": (m["train_seconds"]["total"] / base["train_seconds"]["total"]),
        }
    return out


def _pts(x: float) -> str:
    return f"{x * 100:+.1f}"


def verdict(models: dict[str, Any], comparison: dict[str, Any]) -> str:
    """One or two plain sentences; a gain is claimed only when the whole interval is above zero."""
    if not comparison:
        return "No baseline was trained, so there is nothing to compare against."
    base_acc = models[BASELINE]["accuracy"]["mean"]
    if base_acc is None:
        return "The plain CNN did not train properly on any seed; no comparison can be made."
    main = "maxmin" if "maxmin" in comparison else next(iter(comparison))
    c = comparison[main]
    d = c["accuracy_difference"]
    label = {"maxmin": "MaxMin", "maxmin_half": "cost-matched MaxMin"}.get(main, main)
    if d["mean"] is None:
        return f"{label} did not train properly on any seed; no comparison can be made."
    cost = f"{c['params_ratio']:.1f}x the parameters and {c['latency_ratio']:.1f}x the latency"
    acc = models[main]["accuracy"]["mean"]
    head = f"{label} scored {acc * 100:.1f}% against {base_acc * 100:.1f}% for the plain CNN"
    if d["low"] is None:
        return (
            f"{head} ({_pts(d['mean'])} points) from a single seed, at {cost}; "
            "run several seeds before deciding, one run cannot separate a gain from luck."
        )
    ci = (
        f"{_pts(d['mean'])} points, 95% CI {_pts(d['low'])} to {_pts(d['high'])} "
        f"over {d['n']} seeds"
    )
    if d["low"] > 0:
        first = f"{head} ({ci}), a real gain at {cost}."
        half = comparison.get("maxmin_half") if main == "maxmin" else None
        if half and half["accuracy_difference"]["low"] is not None:
            if half["accuracy_difference"]["low"] > 0:
                return first + (
                    " The cost-matched MaxMin also beats it, so the gain comes from MaxMin "
                    "itself, not from size."
                )
            return first + (
                " The cost-matched MaxMin does not show a reliable gain, so part of it may "
                "come from the extra size."
            )
        return first
    if d["high"] < 0:
        return f"{head} ({ci}): MaxMin is worse on this data; keep the plain CNN."
    return (
        f"{head} ({ci}): no reliable difference on this data, since the interval includes zero; "
        f"at {cost}, MaxMin has not earned its cost, so keep the plain CNN unless more seeds or "
        "more images show a gain."
    )
