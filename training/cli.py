"""The trainer's commands: train, report and demo-data (wired into ``maxmin-inspect`` by the
``maxmin_inspect`` package; ``python -m training.cli`` runs them without the service)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from inspectlib import defaults
from inspectlib.commands import bounded_int, fraction, keep_fraction, positive_int, run_command

DEFAULT_MODELS = ",".join(defaults.MODELS)
Command = Callable[[argparse.Namespace], int]


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "maxmin-inspect"


def add_commands(sub: argparse._SubParsersAction) -> dict[str, Command]:
    """Add train, report and demo-data to ``sub``; returns their handlers by name."""
    t = sub.add_parser(
        "train",
        help="train the models on a folder of labelled images and write the PoC report",
        description="Train every model under identical conditions (same split, seeds, budget) "
        "and write report.json, report.html and checkpoints to the run directory.",
    )
    t.add_argument(
        "data",
        type=Path,
        help="folder of <class>/<image> (optionally train/ and "
        "test/ inside), or a CSV manifest with columns path,label[,split]",
    )
    t.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help=f"comma-separated architectures (default: {DEFAULT_MODELS})",
    )
    t.add_argument(
        "--size",
        type=bounded_int(defaults.SIZE_MIN, defaults.SIZE_MAX),
        default=defaults.SIZE,
        help=f"square input size in pixels, {defaults.SIZE_MIN} to {defaults.SIZE_MAX} "
        "(default: %(default)s)",
    )
    t.add_argument(
        "--channels",
        choices=["auto", "1", "3"],
        default="auto",
        help="1 (grey) or 3 (colour); auto uses 1 when every image is grey",
    )
    t.add_argument(
        "--epochs",
        type=bounded_int(1, defaults.EPOCHS_MAX),
        default=defaults.EPOCHS,
        help="epochs per run (default: %(default)s)",
    )
    t.add_argument(
        "--seeds",
        type=bounded_int(1, defaults.SEEDS_MAX),
        default=defaults.SEEDS,
        help="runs per model with different seeds (default: %(default)s)",
    )
    t.add_argument(
        "--batch-size",
        type=positive_int,
        default=defaults.BATCH_SIZE,
        help="batch size (default: %(default)s)",
    )
    t.add_argument(
        "--optimizer",
        choices=("sgd", "adamw"),
        default=None,
        help="fix the optimizer (sgd: Nesterov momentum) instead of searching; implies --no-search",
    )
    t.add_argument(
        "--lr",
        type=float,
        default=None,
        help="fix the peak learning rate instead of searching (default without the search: 0.05 "
        "for sgd, 0.001 for adamw); implies --no-search",
    )
    t.add_argument(
        "--no-search",
        action="store_true",
        help="skip the recipe search (every model gets SGD-Nesterov, peak lr 0.05, unless "
        "--optimizer/--lr say otherwise); by default each model is offered the same short grid "
        "of optimizers and learning rates and keeps the best on the validation split",
    )
    t.add_argument(
        "--metric",
        choices=("auto", "accuracy", "macro_f1"),
        default="auto",
        help="what picks checkpoints and recipes and states the verdict; auto: macro F1 when the "
        "largest class has 1.5x the images of the smallest, accuracy otherwise",
    )
    t.add_argument(
        "--good-class",
        default=None,
        help="the defect-free class: the report adds each model's escape rate (defective parts "
        "passed as good) and false-reject rate (good parts rejected)",
    )
    t.add_argument(
        "--max-escape-rate",
        type=float,
        default=defaults.MAX_ESCAPE_RATE,
        help="each model's confidence threshold keeps the escape rate (with --good-class) or the "
        "error rate among accepted parts under this on the validation split; parts below it go "
        "to an inspector (default: %(default)s)",
    )
    t.add_argument(
        "--class-weights",
        choices=("sqrt", "inverse", "none"),
        default="sqrt",
        help="loss weight per class, from its frequency (default: sqrt, 1/sqrt(frequency))",
    )
    t.add_argument(
        "--norm",
        choices=("batch", "none"),
        default="batch",
        help="batch: batch normalization after each convolution and the hidden layer, in every "
        "model (default); none: the paper's networks as published",
    )
    t.add_argument(
        "--retries",
        type=int,
        default=defaults.RETRIES,
        help="how many times a failed run (diverged, at chance, or far below its sibling "
        "seeds) is trained again with a fresh seed (default: %(default)s)",
    )
    t.add_argument(
        "--precision",
        choices=("auto", "fp32"),
        default="auto",
        help="auto: bf16 autocast where the GPU or CPU computes in bf16 natively, fp32 elsewhere; "
        "test accuracy is always scored in fp32, as the service runs the models",
    )
    t.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on CUDA, run each training step eagerly instead of replaying a captured CUDA graph "
        "(for comparison or debugging; the results should agree)",
    )
    t.add_argument(
        "--augment",
        default="shift,hflip",
        help="comma-separated from shift, hflip, vflip, or 'none' (default: shift,hflip; "
        "drop hflip when a mirrored part means something else)",
    )
    t.add_argument("--val-fraction", type=fraction, default=defaults.VAL_FRACTION)
    t.add_argument(
        "--test-fraction",
        type=fraction,
        default=defaults.TEST_FRACTION,
        help="ignored when the data has its own test/ folder",
    )
    t.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    t.add_argument(
        "--out", type=Path, default=None, help="run directory (default: runs/<date-time>)"
    )
    t.add_argument(
        "--cache-dir",
        type=Path,
        default=_default_cache(),
        help="where decoded datasets are cached (default: %(default)s)",
    )
    t.add_argument("--no-cache", action="store_true", help="decode again and write no cache")
    t.add_argument(
        "--latency-seconds",
        type=float,
        default=1.0,
        help="time spent measuring each model's latency (default: 1)",
    )
    t.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice, one per core); "
        "lower it when other work shares the machine: oversubscribed cores slow "
        "training several-fold",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument(
        "--compress",
        action="store_true",
        help="after training, run the compression study (as 'maxmin-inspect compress')",
    )
    t.add_argument(
        "--prune",
        type=keep_fraction,
        default=None,
        metavar="KEEP",
        help="with the compression study, also the pruned forms (as 'compress --prune'); "
        "implies --compress",
    )
    t.add_argument(
        "--status-file",
        type=Path,
        default=None,
        help="keep a JSON file of the run's stage, progress and outcome up to date (the "
        "service's training page reads it)",
    )
    t.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower this process's CPU priority by N (e.g. 10 beside a serving service)",
    )

    r = sub.add_parser(
        "report",
        help="re-render report.html from a run's report.json",
        description="Re-render report.html from the report.json in RUN_DIR.",
    )
    r.add_argument("run_dir", type=Path, help="a run directory written by 'train'")

    o = sub.add_parser(
        "operating-point",
        help="choose a run's confidence thresholds again for another target",
        description="Choose each model's confidence threshold of RUN_DIR again from the "
        "validation answers the trainer kept: the lowest threshold that keeps the escape rate "
        "(the run's good class) or the error rate among accepted parts under the target. "
        "Rewrites report.json and report.html; a service serving the run follows within "
        "MAXMIN_RELOAD_SECONDS.",
    )
    o.add_argument("run_dir", type=Path, help="a run directory written by 'train'")
    o.add_argument(
        "--max-escape-rate", type=float, required=True, help="the new target, from 0 to 1"
    )

    c = sub.add_parser(
        "compress",
        help="the compression study: each deployed model in fp32 ONNX and int8",
        description="Export each deployed model of RUN_DIR to ONNX (checked against PyTorch on "
        "the test images), quantize it to int8 calibrated on training images, and add the "
        "compression study (accuracy, macro F1, McNemar against fp32, weights bytes, CPU "
        "latency and throughput) to the run's report. The forms go to RUN_DIR/compressed/, "
        "where MAXMIN_RUNTIME=onnxruntime serves them from.",
    )
    c.add_argument("run_dir", type=Path, help="a run directory written by 'train'")
    c.add_argument(
        "--calibration",
        type=positive_int,
        default=256,
        help="training images that calibrate int8 (default: 256)",
    )
    c.add_argument(
        "--rounds", type=positive_int, default=20, help="timing rounds per form (default: 20)"
    )
    c.add_argument(
        "--prune",
        type=keep_fraction,
        default=None,
        metavar="KEEP",
        help="also prune whole filters, keeping this fraction of each convolution's (e.g. 0.5), "
        "fine-tune, and add the pruned network in fp32 and int8 to the study (1: fine-tune only)",
    )
    c.add_argument(
        "--prune-epochs",
        type=positive_int,
        default=5,
        help="epochs of fine-tuning after pruning (default: 5)",
    )

    x = sub.add_parser(
        "export",
        help="write a Triton model repository from a run's ONNX forms",
        description="Write a Triton Inference Server model repository (config.pbtxt with "
        "dynamic batching, labels.txt, 1/model.onnx per model) from the forms that "
        "'maxmin-inspect compress RUN_DIR' wrote. Any Open Inference Protocol server that runs "
        "ONNX (Triton, KServe, MLServer) serves it; MAXMIN_INFERENCE_URL points the service there.",
    )
    x.add_argument("run_dir", type=Path, help="a run directory, compressed")
    x.add_argument("--triton", type=Path, required=True, metavar="OUT", help="repository folder")
    x.add_argument(
        "--form",
        choices=("fp32", "int8", "pruned-fp32", "pruned-int8"),
        default="fp32",
        help="default: fp32",
    )

    d = sub.add_parser(
        "demo-data",
        help="generate a synthetic parts dataset",
        description="Write synthetic metal-surface images (good, scratch, dent, "
        "spots) as <class>/<image>.png, for trying the product without own data.",
    )
    d.add_argument("dir", type=Path, help="output folder")
    d.add_argument(
        "--per-class", type=positive_int, default=150, help="images per class (default: 150)"
    )
    d.add_argument(
        "--image-size",
        type=positive_int,
        default=96,
        help="side of each image in pixels (default: 96)",
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--stress",
        action="store_true",
        help="write the stress set instead: mostly good parts (1:30 against the rarest defect), "
        "80-400 px in many aspect ratios, faint small defects (--per-class and --image-size "
        "do not apply)",
    )
    return {
        "train": train,
        "report": _report,
        "operating-point": _operating_point,
        "compress": _compress,
        "export": _export,
        "demo-data": _demo,
    }


def train(args: argparse.Namespace) -> int:
    from inspectlib.progress import StatusFile

    if args.nice:
        os.nice(args.nice)
    status = StatusFile(args.status_file)
    status.update(state="starting")
    try:
        run_dir = _train_run(args, status)
    except KeyboardInterrupt:
        status.update(state="failed", message="interrupted")
        raise
    except Exception as exc:
        status.update(state="failed", message=str(exc) or type(exc).__name__)
        raise
    status.update(state="done", run_dir=str(run_dir))
    return 0


def _train_run(args: argparse.Namespace, status) -> Path:  # noqa: ANN001
    from training.engine import DEFAULT_LR, TrainConfig
    from training.poc import PocConfig, run_poc

    augment = tuple(a.strip() for a in args.augment.split(",") if a.strip() and a.strip() != "none")
    unknown = set(augment) - {"shift", "hflip", "vflip"}
    if unknown:
        raise ValueError(
            f"unknown augmentation {', '.join(sorted(unknown))}; use shift, hflip, vflip or none"
        )
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.max_escape_rate < 1:
        raise ValueError(f"--max-escape-rate must be from 0 to 1, got {args.max_escape_rate}")
    if args.retries < 0:
        raise ValueError(f"--retries must be 0 or more, got {args.retries}")
    optimizer = args.optimizer or "sgd"
    search = not (args.no_search or args.lr is not None or args.optimizer is not None)
    if args.val_fraction + args.test_fraction >= 0.8:
        raise ValueError("--val-fraction and --test-fraction leave too little for training")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg = PocConfig(
        data=str(args.data),
        out=str(out),
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        size=args.size,
        channels=args.channels,
        seeds=args.seeds,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        device=args.device,
        cache_dir=None if args.no_cache else str(args.cache_dir),
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=optimizer,
            lr=args.lr if args.lr is not None else DEFAULT_LR[optimizer],
            class_weighting=args.class_weights,
            augment=augment,
            amp=args.precision == "auto",
            cuda_graphs=not args.no_cuda_graphs,
        ),
        latency_budget_s=args.latency_seconds,
        progress=not args.quiet,
        search=search,
        metric=args.metric,
        good_class=args.good_class,
        max_retries=args.retries,
        max_escape_rate=args.max_escape_rate,
        norm=args.norm,
    )
    run_dir = run_poc(cfg, on_progress=status.update)
    import json

    report = json.loads((run_dir / "report.json").read_text())
    print()
    print(report["verdict"])
    print()
    for name, m in report["models"].items():
        cells = []
        for key in ("accuracy", "macro_f1"):
            v, sd = m[key]["mean"], m[key]["std"]
            spread = f" ± {sd * 100:.1f}" if sd is not None else ""
            cells.append("failed" if v is None else f"{v * 100:.1f}%{spread}")
        recipe = m.get("recipe") or {}
        print(
            f"  {name:<12} accuracy {cells[0]:<14} macro F1 {cells[1]:<14} "
            f"params {m['params']:>9,}  {recipe.get('optimizer', '')} lr {recipe.get('lr', '')}"
            + ("" if recipe.get("augment", True) else ", no augmentation")
        )
    if args.compress or args.prune is not None:
        _print_study(_study(run_dir, 256, quiet=args.quiet, prune=args.prune))
    if getattr(args, "after_train", None) is not None:
        args.after_train(args, run_dir)
    print(f"\nReport: {run_dir / 'report.html'}")
    print(f"        {run_dir / 'report.json'}")
    print(f"Checkpoints: {run_dir / 'checkpoints'}")
    return run_dir


def _report(args: argparse.Namespace) -> int:
    from training.report import rerender

    print(f"Wrote {rerender(args.run_dir)}")
    return 0


def _study(
    run_dir: Path,
    calibration: int,
    rounds: int = 20,
    quiet: bool = False,
    prune: float | None = None,
    prune_epochs: int = 5,
) -> dict:
    from training.compress import compress_run

    def say(msg: str) -> None:
        if not quiet:
            print(f"compress: {msg}", file=sys.stderr)

    return compress_run(
        run_dir,
        calibration=calibration,
        rounds=rounds,
        progress=say,
        prune=prune,
        prune_epochs=prune_epochs,
    )


def _print_study(study: dict) -> None:
    print()
    for name, m in study["models"].items():
        for form, f in m["forms"].items():
            print(
                f"  {name:<12} {form:<12} accuracy {f['accuracy'] * 100:5.1f}%  macro F1 "
                f"{f['macro_f1'] * 100:5.1f}% ({f['macro_f1_change'] * 100:+.1f})  "
                f"{f['weights_bytes'] / 1024:8.0f} KiB  p50 {f['latency_ms_p50']:.2f} ms  "
                f"p99 {f['latency_ms_p99']:.2f} ms  {f['images_per_second_batch32']:7.0f} img/s"
            )
    print()
    print(study["verdict"])


def _compress(args: argparse.Namespace) -> int:
    _print_study(
        _study(
            args.run_dir,
            args.calibration,
            args.rounds,
            prune=args.prune,
            prune_epochs=args.prune_epochs,
        )
    )
    print(f"\nForms: {args.run_dir / 'compressed'}; report: {args.run_dir / 'report.html'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.triton import write_repository

    for name, folder in write_repository(args.run_dir, args.triton, args.form).items():
        print(f"{name:12} {folder}")
    print(f"Triton repository ({args.form}): {args.triton}")
    return 0


def _operating_point(args: argparse.Namespace) -> int:
    import getpass

    from inspectlib.decision import retarget_run
    from training.report import rerender

    points = retarget_run(args.run_dir, args.max_escape_rate, f"{getpass.getuser()} (command line)")
    for name, point in points.items():
        v = point["validation"]
        print(
            f"{name:12} threshold {point['threshold']:.4f}: {point['kind'].replace('_', ' ')} "
            f"{v['rate'] * 100:.2f}%, review {v['review_rate'] * 100:.1f}% on the validation split"
        )
    print(f"Wrote {args.run_dir / 'report.json'} and {rerender(args.run_dir)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from training.demo import STRESS_COUNTS, make_demo_dataset, make_stress_dataset

    if args.stress:
        out = make_stress_dataset(args.dir, seed=args.seed)
        counts = ", ".join(f"{n} {label}" for label, n in STRESS_COUNTS.items())
        print(f"Wrote the stress set ({counts}) to {out}")
        return 0
    out = make_demo_dataset(
        args.dir, per_class=args.per_class, size=args.image_size, seed=args.seed
    )
    print(f"Wrote {args.per_class} images per class to {out}")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    """The trainer's own commands, for running it without the service installed."""
    parser = argparse.ArgumentParser(
        prog="python -m training.cli",
        description="Train and compare the models on labelled images; write the PoC report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(handlers=add_commands(sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_command("maxmin-inspect", args.handlers[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
