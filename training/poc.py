"""The PoC run: train every model under identical conditions and write the comparison report."""

from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from tqdm.auto import tqdm

from inspectlib import defaults
from inspectlib.checkpoint import save_checkpoint
from inspectlib.decision import ANSWERS_FILE, answers_of, choose_operating_point, rates_at
from inspectlib.device import resolve_device
from inspectlib.stats import mcnemar, mean_std, paired_bootstrap, rate_interval
from models import create_model, list_models
from training.data import Dataset, load_dataset
from training.engine import RunResult, TrainConfig, Training, precision, score
from training.measure import count_flops, count_params, measure_latency
from training.report import write_html

REPORT_VERSION = 2
BASELINE = "baseline"
# The recipes every model is offered, the first being the fixed recipe of --no-search, which
# trains in full on the first seed; each other one trains for the first third of the schedule, the
# best of them trains on to the end, and the better of the two full runs wins (docs/training.md).
SEARCH_GRID: tuple[tuple[str, float], ...] = (
    ("sgd", 0.05),
    ("sgd", 0.015),
    ("adamw", 1e-3),
    ("adamw", 3e-4),
)
SKEWED = 1.5  # largest class over smallest in the training split: from here, macro F1 decides


def choose_metric(requested: str, train_counts: list[int]) -> tuple[str, str]:
    """The metric that selects checkpoints, recipes and states the verdict, and why."""
    if requested != "auto":
        return requested, "asked for"
    ratio = max(train_counts) / max(min(train_counts), 1)
    if ratio >= SKEWED:
        return "macro_f1", (
            f"the classes are skewed ({ratio:.1f}:1 in the training split), where accuracy "
            "rewards answering the largest class"
        )
    return "accuracy", f"the classes are balanced ({ratio:.1f}:1 in the training split)"


def failed_against_siblings(scores: list[float]) -> list[bool]:
    """A seed far below its siblings is a failed run, not spread: its validation error exceeds
    1.5x the best sibling's error plus 5 points, a margin wider than ordinary seed-to-seed spread
    (docs/training.md)."""
    if len(scores) < 2:
        return [False] * len(scores)
    best_error = 1.0 - max(scores)
    return [(1.0 - s) > 1.5 * best_error + 0.05 for s in scores]


@dataclass
class PocConfig:
    """Everything a PoC run depends on; stored in the report so the run can be repeated."""

    data: str
    out: str
    models: list[str] = field(default_factory=lambda: list(defaults.MODELS))
    size: int = defaults.SIZE
    channels: str = "auto"
    seeds: int = defaults.SEEDS
    split_seed: int = 0
    val_fraction: float = defaults.VAL_FRACTION
    test_fraction: float = defaults.TEST_FRACTION
    device: str = "auto"
    cache_dir: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    latency_budget_s: float = 1.0
    progress: bool = True
    search: bool = True  # the same short recipe search for every model (SEARCH_GRID)
    metric: str = "auto"  # accuracy, macro_f1, or auto: macro F1 when the classes are skewed
    good_class: str | None = None  # names the defect-free class: escape and false-reject rates
    max_retries: int = defaults.RETRIES
    # The operating point: each model's confidence threshold keeps this rate on the validation
    # split, the escape rate with a good class, else the error rate among accepted parts.
    max_escape_rate: float = defaults.MAX_ESCAPE_RATE
    # Batch normalization after every convolution and the hidden layer, in every model: without
    # it, the hidden layer's units die on faint, skewed data (docs/training.md).
    norm: str = "batch"


def write_split(ds: Dataset, path: Path) -> Path:
    """Which image went to which split, so the comparison can be repeated by other code."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for p, y, sp in zip(ds.paths, ds.labels.tolist(), ds.split, strict=True):
            w.writerow([p, ds.classes[y], sp])
    return path


def _model_kwargs(ds: Dataset, norm: str) -> dict[str, int | str]:
    return {
        "num_classes": len(ds.classes),
        "in_channels": ds.channels,
        "image_size": ds.size,
        "norm": norm,
    }


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
    good = _good_index(cfg.good_class, ds.classes)
    if cfg.norm == "batch" and cfg.train.batch_size < 2:
        raise ValueError("--batch-size 1 cannot train with batch normalization; use --norm none")
    out.mkdir(parents=True, exist_ok=True)  # only once the data is usable: no empty run folders
    write_split(ds, out / "split.csv")
    splits, mean, std = ds.resident(device)
    test_y = ds.labels[torch.as_tensor(ds.indices("test"))].numpy()
    kwargs = _model_kwargs(ds, cfg.norm)
    k = len(ds.classes)
    train_counts = torch.bincount(splits["train"][1].cpu(), minlength=k).tolist()
    metric, metric_reason = choose_metric(cfg.metric, train_counts)
    cfg.train.select_metric = metric
    grid = SEARCH_GRID if cfg.search else ((cfg.train.optimizer, cfg.train.lr),)
    search_epochs = search_rung(cfg.train.epochs)
    seeds = list(range(cfg.seeds))
    # Each model's first seed is trained once more without augmentation (_augment_check).
    check_augment = cfg.search and bool(cfg.train.augment) and bool(seeds)
    total = len(cfg.models) * (
        len(seeds) * cfg.train.epochs
        + (search_cost(grid, cfg.train.epochs) if cfg.search else 0)
        + (cfg.train.epochs if check_augment else 0)
    )
    val_y = ds.labels[torch.as_tensor(ds.indices("val"))].numpy()
    progress(state="training", epochs_done=0, epochs_total=total)
    train_start = time.perf_counter()
    done = 0  # epochs counted here: a disabled progress bar counts nothing
    recipes: dict[str, dict[str, Any]] = {}
    results: dict[str, list[RunResult]] = {m: [] for m in cfg.models}
    retries: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.models}
    with tqdm(total=total, desc="training", unit="epoch", disable=not cfg.progress) as bar:

        def count(epochs: int) -> None:
            """Epochs the bar expected that will not be trained (a run stopped early)."""
            nonlocal done
            bar.update(epochs)
            done += epochs

        def start(arch: str, seed: int, tc: TrainConfig, what: str) -> Training:
            def on_epoch(epoch: int, loss: float, val: float) -> None:
                nonlocal done
                detail = f"{arch} {what} loss {loss:.3f} val {val:.3f}"
                bar.set_postfix_str(detail)
                bar.update(1)
                done += 1
                spent = time.perf_counter() - train_start
                left = spent / done * (bar.total - done) if done else None
                progress(
                    epochs_done=done,
                    epochs_total=bar.total,
                    model=arch,
                    seed=seed,
                    detail=detail,
                    eta_seconds=round(left, 1) if left is not None else None,
                )

            return Training(arch, kwargs, splits, mean, std, seed, tc, on_epoch=on_epoch)

        def advance(run: Training, until: int | None = None) -> Training:
            until = run.cfg.epochs if until is None else until
            run.advance(until)
            count(until - run.epoch)
            return run

        def train(arch: str, seed: int, tc: TrainConfig, what: str) -> RunResult:
            return advance(start(arch, seed, tc, what)).finish()

        # The fixed recipe (the grid's first entry) is every model's incumbent. Its first seed
        # trains for the whole budget, with and without augmentation when that is checked, and
        # augmentation is decided on those pairs before any other recipe is tried: the search then
        # compares recipes under the training the seeds will get (_search, docs/training.md).
        first = seeds[0] if seeds else 0
        fixed = replace(cfg.train, optimizer=grid[0][0], lr=grid[0][1])
        settings = {"with": fixed}
        if check_augment:
            settings["without"] = replace(fixed, augment=())
        incumbents: dict[str, dict[str, tuple[RunResult, float, float]]] = {}
        for arch in cfg.models:
            incumbents[arch] = {}
            for key, tc in settings.items():
                t0 = time.perf_counter()
                what = f"seed {first}" + (" without augmentation" if key == "without" else "")
                run = advance(start(arch, first, tc, what), search_epochs)
                at_rung = run.best_score()  # its short trial, read off the way
                done_run = advance(run).finish()
                incumbents[arch][key] = (done_run, at_rung, time.perf_counter() - t0)
        # Augmentation is decided once, for every model, on all their pairs (_augment_check).
        augmentation = None
        if check_augment:
            augmentation = _augment_check(
                [incumbents[a]["with"][0] for a in cfg.models],
                [incumbents[a]["without"][0] for a in cfg.models],
                val_y,
                metric,
                k,
            )
        kept = (
            "without" if augmentation is not None and augmentation["kept"] == "without" else "with"
        )
        base = settings[kept]
        for arch in cfg.models:
            run, at_rung, took = incumbents[arch][kept]
            recipe, won = _search(
                arch, grid, first, base, run, at_rung, took, start, advance, count
            )
            recipes[arch] = recipe
            if augmentation is not None:  # checked: this model's own pair, for the report
                check = _augment_check(
                    [incumbents[arch]["with"][0]],
                    [incumbents[arch]["without"][0]],
                    val_y,
                    metric,
                    k,
                )
                check["seconds"] = round(incumbents[arch]["without"][2], 3)
                check.update(
                    model_kept=check["kept"],
                    kept=augmentation["kept"],
                    reason="decided with every model's pair: " + augmentation["reason"],
                )
                recipe["augment_check"] = check
                recipe["seconds"] = round(recipe["seconds"] + check["seconds"], 3)
            tc = replace(base, optimizer=recipe["optimizer"], lr=recipe["lr"])
            runs = [won] if seeds else []  # the search's winning full run is the first seed's
            recipe["augment"] = list(tc.augment)
            runs += [train(arch, seed, tc, f"seed {seed}") for seed in seeds[1:]]
            for attempt in range(1, cfg.max_retries + 1):
                failed = _failed(runs)
                if not any(failed):
                    break
                for slot, why in enumerate(failed):
                    if why is None:
                        continue
                    seed = seeds[slot] + 100 * attempt
                    bar.total += tc.epochs
                    new = train(arch, seed, tc, f"retry seed {seed}")
                    retries[arch].append(
                        {"slot": slot, "failed_seed": runs[slot].seed, "reason": why, "seed": seed}
                    )
                    runs[slot] = new
            for r, why in zip(runs, _failed(runs), strict=True):
                if r.diverged is None and why is not None:
                    r.diverged = why  # still failed after the retries: excluded, and counted
            results[arch] = runs
    progress(state="reporting", epochs_done=done, epochs_total=done, eta_seconds=None)
    meta_common = {
        "model_kwargs": kwargs,
        "classes": ds.classes,
        "preprocess": ds.preprocess.to_dict(),
        "data_fingerprint": ds.fingerprint,
    }
    models_report: dict[str, Any] = {}
    kept_answers: dict[str, Any] = {}
    for arch, runs in results.items():
        models_report[arch] = _model_section(
            arch, runs, ds, test_y, meta_common, out, device, cfg.latency_budget_s, metric, good
        )
        models_report[arch]["operating_point"] = _operating_point(
            runs, models_report[arch], ds, test_y, good, cfg.max_escape_rate
        )
        deployed = _deployed_run(runs, models_report[arch])
        if deployed is not None and deployed.val_prob is not None:
            kept_answers[arch] = {
                "seed": deployed.seed,
                "validation": answers_of(deployed.val_prob, val_y),
                "test": answers_of(deployed.test_prob, test_y),
            }
        models_report[arch]["recipe"] = recipes[arch]
        models_report[arch]["retries"] = retries[arch]
    comparison = _comparison(results, models_report, test_y, metric, k)
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
        "metric": {
            "name": metric,
            "reason": metric_reason,
            "interval": "paired bootstrap over seeds and test images, 95%",
            "good_class": cfg.good_class,
        },
        "search": {
            "enabled": cfg.search,
            "grid": [{"optimizer": o, "lr": lr} for o, lr in grid],
            "epochs": search_epochs if cfg.search else 0,
            # The best other trial, carried on to the whole budget against the fixed recipe's run.
            "final_epochs": cfg.train.epochs if cfg.search else 0,
            "seed": seeds[0] if seeds else 0,
            # Each model's first seed under the fixed recipe, with and without augmentation, for the
            # whole budget, before the search.
            "augment_check": check_augment,
            # The decision on augmentation, from every model's pair: the same for every model.
            "augmentation": augmentation,
            "seconds": round(sum(r["seconds"] for r in recipes.values()), 3),
        },
        "verdict": verdict(models_report, comparison, metric),
    }
    report["run"]["wall_seconds"] = round(time.perf_counter() - started, 3)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    # The deployed checkpoints' answers on validation and test, so that the operating point's
    # target can be changed later (inspectlib.decision.retarget_run) without the images.
    (out / ANSWERS_FILE).write_text(json.dumps(kept_answers))
    write_html(report, out / "report.html")
    return out


def _good_index(good_class: str | None, classes: list[str]) -> int | None:
    if good_class is None:
        return None
    if good_class not in classes:
        raise ValueError(
            f"--good-class {good_class!r} is not a class of this data; the classes are: "
            + ", ".join(classes)
        )
    return classes.index(good_class)


def _failed(runs: list[RunResult]) -> list[str | None]:
    """Why each run counts as failed (diverged, at chance, or far below its siblings), or None."""
    best = [max(r.val_metric) if r.val_metric and r.diverged is None else 0.0 for r in runs]
    low = failed_against_siblings(best)
    out: list[str | None] = []
    for r, b, is_low in zip(runs, best, low, strict=True):
        if r.diverged is not None:
            out.append(r.diverged)
        elif is_low:
            out.append(
                f"far below its siblings: best validation score {b:.3f} against {max(best):.3f}"
            )
        else:
            out.append(None)
    return out


def search_rung(epochs: int) -> int:
    """Epochs every grid entry trains before the short list is drawn: a third of the schedule."""
    return max(1, min(epochs, max(3, epochs // 3)))


def search_cost(grid: tuple[tuple[str, float], ...], epochs: int) -> int:
    """Epochs the search trains beyond the first seed's own run, with every run to its end: the
    short trial of each entry after the first, and the best of them carried on to the end."""
    if len(grid) < 2:
        return 0
    rung = search_rung(epochs)
    return (len(grid) - 1) * rung + (epochs - rung)


def _search(
    arch: str,
    grid: tuple[tuple[str, float], ...],
    seed: int,
    base: TrainConfig,
    incumbent: RunResult,
    incumbent_at_rung: float,
    incumbent_seconds: float,
    start: Callable[[str, int, TrainConfig, str], Training],
    advance: Callable[[Training, int | None], Training],
    count: Callable[[int], None],
) -> tuple[dict[str, Any], RunResult]:
    """The recipe for ``arch`` and its winning run, the first seed's run.

    ``incumbent`` is the first seed's full run of the grid's first entry, the fixed recipe, under
    ``base`` (augmentation already decided); it took ``incumbent_seconds``, and
    ``incumbent_at_rung`` is its best validation score a third of the way through. Every other
    entry trains for that first third and is scored on the validation split; the best of them
    (ties go to the earlier entry) trains on to the end, and the better of the two full runs on
    validation wins (a tie keeps the fixed recipe). Recipes can change places between a third of
    the budget and the whole of it, so the final choice is made on full runs; the short trials
    only choose the challenger. Only the validation split is seen; the test split is untouched."""
    full = 0.0 if incumbent.diverged else max(incumbent.val_metric, default=0.0)
    if len(grid) == 1:
        optimizer, lr = grid[0]
        return {
            "optimizer": optimizer,
            "lr": lr,
            "searched": False,
            "trials": [],
            "finals": [],
            "seconds": 0.0,
        }, incumbent
    t0 = time.perf_counter()
    rung = search_rung(base.epochs)
    runs = []
    for optimizer, lr in grid[1:]:
        tc = replace(base, optimizer=optimizer, lr=lr)
        runs.append(advance(start(arch, seed, tc, f"search {optimizer} lr {lr:g}"), rung))
    scores = [incumbent_at_rung] + [r.best_score() for r in runs]
    trials = [
        {"optimizer": o, "lr": lr, "val": round(v, 5)}
        for (o, lr), v in zip(grid, scores, strict=True)
    ]
    finals = []
    if incumbent.diverged is None:
        finals.append({"optimizer": grid[0][0], "lr": grid[0][1], "val": round(full, 5)})
    alive = [i for i, r in enumerate(runs) if r.diverged is None]
    winner, won = 0, incumbent
    if alive:
        best = min(alive, key=lambda i: (-scores[i + 1], i))
        challenger = advance(runs[best], None)
        finals.append(
            {
                "optimizer": grid[best + 1][0],
                "lr": grid[best + 1][1],
                "val": round(challenger.best_score(), 5),
            }
        )
        if challenger.best_score() > full or incumbent.diverged is not None:
            winner, won = best + 1, challenger.finish()
    else:  # the bar counted a challenger's full run; a diverged run is not carried on
        count(base.epochs - rung)
    return {
        "optimizer": grid[winner][0],
        "lr": grid[winner][1],
        "searched": True,
        "epochs": rung,
        "trials": trials,
        "finals": finals,
        # Time beyond the first seed's own run.
        "seconds": round(
            max(0.0, time.perf_counter() - t0 + incumbent_seconds - won.train_seconds), 3
        ),
    }, won


def _augment_check(
    with_aug: list[RunResult],
    without: list[RunResult],
    val_y: np.ndarray,
    metric: str,
    k: int,
) -> dict[str, Any]:
    """Whether augmentation stays, from pairs of runs (one per model, the same seed trained with
    and without it for the whole budget): dropped when the runs without it score higher on the
    validation split, on the mean over the pairs. The 95 % paired bootstrap interval of that mean
    (over the validation images; the models are not a sample) says how sure the choice is.

    Shifts and flips are a regularizer, and whether they pay is a property of the data, not of
    one model: the decision pools every model's pair, which averages out each model's own run
    noise, and every model then trains the same way. Their cost shows early in a run and their
    benefit late, so the choice is made on full runs, not short trials. It is made on the mean,
    as the search chooses learning rates and optimizers: a burden of proof on one side would keep
    that side whenever a small validation split cannot tell, a bias the search does not have
    (docs/training.md)."""
    pairs = [
        (w, wo)
        for w, wo in zip(with_aug, without, strict=True)
        if all(r.diverged is None and r.val_prob is not None for r in (w, wo))
    ]
    if not pairs:
        return {"kept": "with", "reason": "a run did not train; the default stands"}
    preds_with = [np.asarray(w.val_prob).argmax(1) for w, _ in pairs]
    preds_without = [np.asarray(wo.val_prob).argmax(1) for _, wo in pairs]
    diff = paired_bootstrap(metric, val_y, preds_without, preds_with, k, draw_pairs=False)
    higher = diff["mean"] is not None and diff["mean"] > 0
    clear = diff["low"] is not None and (diff["low"] > 0 or diff["high"] < 0)
    return {
        "kept": "without" if higher else "with",
        # Scored as the bootstrap scores them: the kept weights, in fp32.
        "val_with": round(float(np.mean([score(metric, val_y, p, k) for p in preds_with])), 5),
        "val_without": round(
            float(np.mean([score(metric, val_y, p, k) for p in preds_without])), 5
        ),
        "difference": {key: diff[key] for key in ("mean", "low", "high")},
        "pairs": len(pairs),
        "clear": clear,
        "reason": ("higher without it" if higher else "not higher without it")
        + ("" if clear else ", within the validation split's noise"),
    }


def _model_section(
    arch: str,
    runs: list[RunResult],
    ds: Dataset,
    test_y: np.ndarray,
    meta_common: dict,
    out: Path,
    device: torch.device,
    latency_budget_s: float,
    metric: str = "accuracy",
    good: int | None = None,
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
                f"best_val_{metric}": max(r.val_metric) if r.val_metric else None,
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
                "best_val": meta["metrics"][f"best_val_{metric}"],
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
        key=lambda c: c["best_val"] or 0.0,
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
        "score": {**mean_std(ok_f1 if metric == "macro_f1" else ok_acc), "metric": metric},
        "diverged": [{"seed": r.seed, "reason": r.diverged} for r in runs if r.diverged],
        "seeds_failed": sum(r.diverged is not None for r in runs),
        "seeds_run": len(runs),
        **_plant_rates(valid, test_y, good),
        "per_class": per_class,
        "confusion_matrix": cm_total.tolist(),
        "confusion_matrix_note": f"test set, summed over {len(valid)} seed(s)",
        "curves": [
            {
                "seed": r.seed,
                "train_loss": [round(v, 5) for v in r.train_loss],
                "val_accuracy": [round(v, 5) for v in r.val_accuracy],
                "val_score": [round(v, 5) for v in r.val_metric],
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


def _deployed_run(runs: list[RunResult], section: dict) -> RunResult | None:
    """The seed whose checkpoint the run deploys."""
    path = section["checkpoint"]
    return next((r for r in runs if path and path.endswith(f"-seed{r.seed}")), None)


def _operating_point(
    runs: list[RunResult],
    section: dict,
    ds: Dataset,
    test_y: np.ndarray,
    good: int | None,
    target: float,
) -> dict | None:
    """The deployed checkpoint's confidence threshold, chosen on the validation split, and what it
    gives on the test split (``inspectlib.decision``)."""
    run = _deployed_run(runs, section)
    if run is None or run.val_prob is None:
        return None
    val_y = ds.labels[torch.as_tensor(ds.indices("val"))].numpy()
    point = choose_operating_point(run.val_prob, val_y, target, good)
    point["test"] = rates_at(run.test_prob, test_y, point["threshold"], good)
    point["seed"] = run.seed
    return point


def _plant_rates(runs: list[RunResult], test_y: np.ndarray, good: int | None) -> dict[str, Any]:
    """What a plant pays for, when the good class is known: the escape rate (defective parts
    passed as good) and the false-reject rate (good parts rejected), over the valid seeds."""
    if good is None or not runs:
        return {}
    defective, ok = test_y != good, test_y == good
    return {
        "escape_rate": rate_interval([r.test_pred[defective] == good for r in runs]),
        "false_reject_rate": rate_interval([r.test_pred[ok] != good for r in runs]),
    }


def _comparison(
    results: dict[str, list[RunResult]],
    models: dict[str, Any],
    test_y: np.ndarray,
    metric: str = "accuracy",
    k: int = 2,
) -> dict[str, Any]:
    """Each model against the baseline on the same test images: the difference in ``metric``
    (paired bootstrap over seeds and images), McNemar per seed pair, cost ratios. Seeds pair by
    slot, so a retried seed is compared with the baseline's run in the same slot."""
    preds = {name: m.pop("_test_pred") for name, m in models.items()}
    if BASELINE not in models:
        return {}
    base = models[BASELINE]
    out: dict[str, Any] = {}
    slots = {
        name: {i: np.asarray(r.test_pred) for i, r in enumerate(runs) if r.diverged is None}
        for name, runs in results.items()
    }
    for name, m in models.items():
        if name == BASELINE:
            continue
        common = sorted(set(slots[name]) & set(slots[BASELINE]))
        a = [slots[name][i] for i in common]
        b = [slots[BASELINE][i] for i in common]
        tests = []
        for i in common:
            t = mcnemar(slots[name][i] == test_y, slots[BASELINE][i] == test_y)
            tests.append({"slot": i, **t})
        out[name] = {
            "metric": metric,
            "difference": paired_bootstrap(metric, test_y, a, b, k),
            "accuracy_difference": paired_bootstrap("accuracy", test_y, a, b, k),
            "mcnemar": tests,
            "mcnemar_significant_seeds": sum(t["p_value"] < 0.05 for t in tests),
            "params_ratio": m["params"] / base["params"],
            "flops_ratio": m["flops"] / base["flops"],
            "latency_ratio": m["latency_p50_ms"] / base["latency_p50_ms"],
            "train_time_ratio": (m["train_seconds"]["total"] / base["train_seconds"]["total"]),
        }
    del preds
    return out


def _pts(x: float) -> str:
    return f"{x * 100:+.1f}"


METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro F1"}
LABELS = {"maxmin": "MaxMin", "maxmin_half": "cost-matched MaxMin"}


def _failures(models: dict[str, Any], name: str) -> str:
    m = models[name]
    if not m.get("seeds_failed"):
        return ""
    label = LABELS.get(name, "the plain CNN" if name == BASELINE else name)
    return (
        f" {label} failed to train on {m['seeds_failed']} of {m['seeds_run']} seed(s) even "
        "after retries, a risk that counts against it."
    )


def verdict(models: dict[str, Any], comparison: dict[str, Any], metric: str = "accuracy") -> str:
    """One or two plain sentences; a gain is claimed only when the whole interval is above zero."""
    if not comparison:
        return "No baseline was trained, so there is nothing to compare against."
    name = METRIC_NAMES.get(metric, metric)
    base_score = models[BASELINE]["score"]["mean"]
    if base_score is None:
        return "The plain CNN did not train properly on any seed; no comparison can be made."
    main = "maxmin" if "maxmin" in comparison else next(iter(comparison))
    c = comparison[main]
    d = c["difference"]
    label = LABELS.get(main, main)
    if d["mean"] is None:
        return f"{label} did not train properly on any seed; no comparison can be made."
    cost = f"{c['params_ratio']:.1f}x the parameters and {c['latency_ratio']:.1f}x the latency"
    sc = models[main]["score"]["mean"]
    head = (
        f"{label} reached {sc * 100:.1f}% {name} against {base_score * 100:.1f}% for the plain CNN"
    )
    risks = _failures(models, main) + _failures(models, BASELINE)
    ci = (
        f"{_pts(d['mean'])} points, 95% CI {_pts(d['low'])} to {_pts(d['high'])} "
        f"over {d['n']} seed(s) and the test images"
    )
    if d["n"] < 2:
        risks += (
            " One seed cannot separate a gain from a lucky run: run several seeds before deciding."
        )
    if d["low"] > 0:
        first = f"{head} ({ci}), a real gain at {cost}."
        half = comparison.get("maxmin_half") if main == "maxmin" else None
        if half and half["difference"]["low"] is not None:
            if half["difference"]["low"] > 0:
                return (
                    first
                    + risks
                    + (
                        " The cost-matched MaxMin also beats it, so the gain comes from MaxMin "
                        "itself, not from size."
                    )
                )
            return (
                first
                + risks
                + (
                    " The cost-matched MaxMin does not show a reliable gain, so part of it may "
                    "come from the extra size."
                )
            )
        return first + risks
    if d["high"] < 0:
        return f"{head} ({ci}): MaxMin is worse on this data; keep the plain CNN." + risks
    return (
        f"{head} ({ci}): no reliable difference on this data, since the interval includes zero; "
        f"at {cost}, MaxMin has not earned its cost, so keep the plain CNN unless more seeds or "
        "more images show a gain." + risks
    )
