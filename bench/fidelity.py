"""The trainer's figures beside an independent textbook loop's, on the same split.

For each data folder: run ``maxmin-inspect train`` (every default unless told otherwise), read the
split it wrote (``split.csv``), then train the same architectures with a plain PyTorch loop that
shares no code with ``training/``: PIL decoding and resizing, SGD with Nesterov momentum on a
one-cycle schedule, unweighted cross-entropy, no augmentation, the last epoch's weights. Its
networks are the trainer's (batch normalization, PyTorch's own initialization), the ones in which
MaxMin trains under this textbook recipe; ``--reference-norm none`` runs the paper's networks as
published instead, where the reference's MaxMin may stay at chance and so compare nothing.
Prints, per model, test accuracy and macro F1 (mean ± sd over seeds) for both, and checks the
targets:

- no seed of any model ends at chance or diverged (the trainer's own figures);
- each model's mean macro F1 is at least the reference's minus 1 point;
- wherever the reference's interval for MaxMin minus the baseline excludes zero, the trainer's
  verdict has the same sign.

    python bench/fidelity.py DATA_DIR [DATA_DIR ...] --out bench/results/fidelity.json \
        [--train-args '--good-class ok']
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models import create_model

REF_RECIPE = {
    "optimizer": "SGD, Nesterov momentum 0.9, weight decay 5e-4",
    "schedule": "one-cycle to a peak lr of 0.05",
    "batch_size": 64,
    "loss": "cross-entropy, no class weights",
    "augmentation": "none",
    "weights": "last epoch",
    "model": "the trainer's networks (batch normalization), PyTorch's default initialization",
}


def macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Unweighted mean of the per-class F1 scores (0 for a class never predicted nor present)."""
    cm = np.bincount(y * k + p, minlength=k * k).reshape(k, k).astype(float)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def load_split(run_dir: Path, size: int, channels: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """The trainer's split, decoded here with PIL: bilinear squash to size x size."""
    rows = list(csv.DictReader((run_dir / "split.csv").open()))
    classes = sorted({r["label"] for r in rows})
    out = {}
    for split in ("train", "val", "test"):
        part = [r for r in rows if r["split"] == split]
        xs = []
        for r in part:
            with Image.open(r["path"]) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                im = im.resize((size, size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
            xs.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
        x = torch.from_numpy(np.stack(xs)).float() / 255.0
        y = torch.tensor([classes.index(r["label"]) for r in part])
        out[split] = (x, y)
    mean = out["train"][0].mean(dim=(0, 2, 3), keepdim=True)
    std = out["train"][0].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    return {s: ((x - mean) / std, y) for s, (x, y) in out.items()} | {"classes": classes}


def reference_fit(
    arch: str, data: dict, seed: int, epochs: int, lr: float = 0.05, norm: str = "none"
) -> np.ndarray:
    """The textbook loop: returns the test predictions of the last epoch's weights."""
    torch.manual_seed(seed)
    x, y = data["train"]
    k = len(data["classes"])
    model = create_model(
        arch, num_classes=k, in_channels=x.shape[1], image_size=x.shape[2], norm=norm
    )
    for m in model.modules():  # PyTorch's own initialization, as a textbook script would have
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.reset_parameters()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batch = REF_RECIPE["batch_size"]
    steps = (len(x) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        xt, _ = data["test"]
        return torch.cat([model(xt[i : i + 256]).argmax(1) for i in range(0, len(xt), 256)]).numpy()


def paired_interval(a: list[np.ndarray], b: list[np.ndarray], y: np.ndarray, k: int) -> list:
    """95% bootstrap interval of mean macro F1 (a - b), resampling seeds and test images."""
    rng = np.random.default_rng(0)
    n, s = len(y), len(a)
    diffs = []
    for _ in range(1000):
        seeds = rng.integers(0, s, s)
        idx = rng.integers(0, n, n)
        diffs.append(
            np.mean(
                [macro_f1(y[idx], a[j][idx], k) - macro_f1(y[idx], b[j][idx], k) for j in seeds]
            )
        )
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


def summary(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
        "per_seed": [round(float(v), 4) for v in arr],
    }


def fmt(s: dict) -> str:
    sd = f" ± {s['sd'] * 100:.1f}" if s["sd"] is not None else ""
    return f"{s['mean'] * 100:5.1f}{sd}"


def run_one(data_dir: Path, args: argparse.Namespace) -> dict:
    run_dir = Path(args.runs) / data_dir.name
    t0 = time.perf_counter()
    if not (args.reuse and (run_dir / "report.json").is_file()):
        cmd = [
            sys.executable, "-m", "training.cli", "train", str(data_dir), "--out", str(run_dir),
            "--seeds", str(args.seeds), "--quiet", *args.trainer_args,
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
    trainer_seconds = time.perf_counter() - t0
    report = json.loads((run_dir / "report.json").read_text())
    size, channels = report["dataset"]["size"], report["dataset"]["channels"]
    epochs = report["run"]["config"]["train"]["epochs"]
    data = load_split(run_dir, size, channels)
    k = len(data["classes"])
    y = data["test"][1].numpy()
    out = {"data": str(data_dir), "size": size, "trainer_seconds": round(trainer_seconds, 1)}
    out["split_sha256"] = _split_sha(run_dir)
    models, ref_preds = {}, {}
    earlier = (
        _earlier_reference(args, data_dir, size, report, run_dir) if args.reference_from else None
    )
    t0 = time.perf_counter()
    for arch, m in report["models"].items():
        if earlier is None:
            preds = [
                reference_fit(arch, data, seed, epochs, norm=args.reference_norm)
                for seed in range(args.seeds)
            ]
            ref_preds[arch] = preds
            reference = {
                "accuracy": summary([float(np.mean(p == y)) for p in preds]),
                "macro_f1": summary([macro_f1(y, p, k) for p in preds]),
            }
        else:
            reference = earlier["models"][arch]["reference"]
        models[arch] = {
            "trainer": {
                "accuracy": summary(m["accuracy"]["per_seed"]),
                "macro_f1": summary(m["macro_f1"]["per_seed"]),
                "failed_seeds": [d["seed"] for d in m["diverged"]],
                "retries": m.get("retries", []),
                "recipe": m.get("recipe"),
            },
            "reference": reference,
        }
    out["reference_seconds"] = round(time.perf_counter() - t0, 1)
    if earlier is not None:
        out["reference_from"] = str(args.reference_from)
        out["reference_seconds"] = earlier.get("reference_seconds")
    out["models"] = models
    checks = {
        "no_failed_seed": all(not v["trainer"]["failed_seeds"] for v in models.values()),
        "macro_f1_within_1_point": {
            a: v["trainer"]["macro_f1"]["mean"] >= v["reference"]["macro_f1"]["mean"] - 0.01
            for a, v in models.items()
        },
    }
    signs = {}
    for arch in models:
        if arch == "baseline" or "baseline" not in models:
            continue
        if earlier is None:
            ci = paired_interval(ref_preds[arch], ref_preds["baseline"], y, k)
        else:
            ci = earlier["checks"]["verdict_sign"][arch]["reference_macro_f1_difference_ci"]
        trainer = report["comparison"].get(arch, {}).get("difference", {})
        agree = None
        if ci[0] > 0 or ci[1] < 0:
            mean = trainer.get("mean")
            agree = mean is not None and (mean > 0) == (ci[0] > 0)
        signs[arch] = {
            "reference_macro_f1_difference_ci": ci,
            "trainer_difference": trainer,
            "sign_agrees": agree,
        }
    checks["verdict_sign"] = signs
    out["checks"] = checks
    out["verdict"] = report["verdict"]
    return out


def _earlier_reference(
    args: argparse.Namespace, data_dir: Path, size: int, report: dict, run_dir: Path
) -> dict:
    """The reference side of an earlier results file, for the same data, size, seeds, epochs and
    split: the textbook loop does not change with the trainer, so a rerun of the trainer's side
    can be set beside it without training the reference again."""
    earlier = json.loads(Path(args.reference_from).read_text())
    if earlier.get("reference_recipe", {}).get("model") != REF_RECIPE["model"]:
        raise SystemExit(
            f"{args.reference_from}: its reference ran other networks (--reference-norm)"
        )
    for entry in earlier["datasets"]:
        if Path(entry["data"]).resolve() != data_dir.resolve() or entry["size"] != size:
            continue
        if entry.get("split_sha256") not in (None, _split_sha(run_dir)):
            raise SystemExit(f"{args.reference_from}: its split differs from this run's")
        seeds = {len(v["reference"]["macro_f1"]["per_seed"]) for v in entry["models"].values()}
        if seeds != {args.seeds} or set(entry["models"]) != set(report["models"]):
            raise SystemExit(f"{args.reference_from}: other seeds or models than this run")
        return entry
    raise SystemExit(f"{args.reference_from} has no reference for {data_dir} at {size} px")


def _split_sha(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha256((run_dir / "split.csv").read_bytes()).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", nargs="+", type=Path, help="image folders (<class>/<image>)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--runs", default="runs/fidelity", help="where the trainer's runs go")
    p.add_argument("--reuse", action="store_true", help="reuse a finished trainer run")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument(
        "--reference-from",
        type=Path,
        default=None,
        help="take the reference side from an earlier results file (same data, split, seeds)",
    )
    p.add_argument(
        "--reference-norm",
        choices=("none", "batch"),
        default="batch",
        help="the reference's networks: batch, the trainer's, with batch normalization, in which "
        "MaxMin trains under the textbook recipe (default); none, the paper's as published",
    )
    p.add_argument(
        "--train-args", default="", help="extra options for train, e.g. '--good-class ok'"
    )
    args = p.parse_args()
    args.trainer_args = shlex.split(args.train_args)
    torch.set_num_threads(torch.get_num_threads())
    if args.reference_norm == "none":
        REF_RECIPE["model"] = (
            "the paper's networks (no normalization layers), PyTorch's default initialization"
        )
    results = {"reference_recipe": REF_RECIPE, "torch": torch.__version__, "datasets": []}
    for data_dir in args.data:
        r = run_one(data_dir, args)
        results["datasets"].append(r)
        print(f"\n{data_dir}  ({r['size']} px; trainer {r['trainer_seconds']} s)")
        print(f"  {'model':12} {'trainer acc':>13} {'F1':>13}   {'reference acc':>13} {'F1':>13}")
        for arch, v in r["models"].items():
            t, ref = v["trainer"], v["reference"]
            print(
                f"  {arch:12} {fmt(t['accuracy']):>13} {fmt(t['macro_f1']):>13}   "
                f"{fmt(ref['accuracy']):>13} {fmt(ref['macro_f1']):>13}"
            )
        print(f"  checks: {json.dumps(r['checks'])}")
        print(f"  verdict: {r['verdict']}")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
