"""The ``maxmin-inspect`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

DEFAULT_MODELS = "baseline,maxmin,maxmin_half"


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "maxmin-inspect"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be between 0 and 0.5, got {value}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="maxmin-inspect",
        description="Is the MaxMin CNN worth its cost on your part images? Train, compare, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
        "--size", type=_positive_int, default=64, help="square input size in pixels (default: 64)"
    )
    t.add_argument(
        "--channels",
        choices=["auto", "1", "3"],
        default="auto",
        help="1 (grey) or 3 (colour); auto uses 1 when every image is grey",
    )
    t.add_argument("--epochs", type=_positive_int, default=30, help="epochs per run (default: 30)")
    t.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        help="runs per model with different seeds (default: 3)",
    )
    t.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default: 32)")
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
        default=2,
        help="how many times a failed run (diverged, at chance, or far below its sibling "
        "seeds) is trained again with a fresh seed (default: 2)",
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
    t.add_argument("--val-fraction", type=_fraction, default=0.15)
    t.add_argument(
        "--test-fraction",
        type=_fraction,
        default=0.15,
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
        type=_positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice, one per core); "
        "lower it when other work shares the machine: oversubscribed cores slow "
        "training several-fold",
    )
    t.add_argument(
        "--no-register",
        action="store_true",
        help="do not register the finished run in the service's database",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars")
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

    d = sub.add_parser(
        "demo-data",
        help="generate a synthetic parts dataset",
        description="Write synthetic metal-surface images (good, scratch, dent, "
        "spots) as <class>/<image>.png, for trying the product without own data.",
    )
    d.add_argument("dir", type=Path, help="output folder")
    d.add_argument(
        "--per-class", type=_positive_int, default=150, help="images per class (default: 150)"
    )
    d.add_argument(
        "--image-size",
        type=_positive_int,
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

    db = sub.add_parser(
        "db",
        help="database maintenance",
        description="Apply the schema migrations to DATABASE_URL (default: SQLite "
        "in the data directory).",
    )
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", help="migrate the database to the current schema")
    db_sub.add_parser("current", help="print the database's schema revision")

    s = sub.add_parser(
        "serve",
        help="start the inspection service",
        description="Migrate the database, then serve the API and the pages.",
    )
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    s.add_argument("--port", type=_positive_int, default=8000, help="port (default: 8000)")
    s.add_argument("--workers", type=_positive_int, default=1, help="processes (default: 1)")

    k = sub.add_parser(
        "keys",
        help="API keys: create, list, revoke",
        description="API keys with roles: line (predict), inspector (also label "
        "and the inspector page), manager (also dashboard, reports, stats), admin.",
    )
    k_sub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = k_sub.add_parser("create", help="create a key and print it once")
    kc.add_argument("--role", required=True, choices=["line", "inspector", "manager", "admin"])
    kc.add_argument("--name", required=True, help="who or what uses it, e.g. line-3 or anna")
    k_sub.add_parser("list", help="list keys (never the keys themselves)")
    kr = k_sub.add_parser("revoke", help="revoke a key by id or prefix")
    kr.add_argument("key", help="the id or the prefix shown by 'keys list'")

    i = sub.add_parser(
        "import-run",
        help="register an existing run directory in the database",
        description="Register RUN_DIR's report and model versions so the service "
        "lists it and can serve its models.",
    )
    i.add_argument("run_dir", type=Path, help="a run directory written by 'train'")
    i.add_argument(
        "--serve",
        action="store_true",
        help="also make it the run the service serves (running services switch within seconds)",
    )
    return parser


def _train(args: argparse.Namespace) -> int:
    from training.progress import StatusFile

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
        )
    if not args.no_register:
        _register(run_dir)
    print(f"\nReport: {run_dir / 'report.html'}")
    print(f"        {run_dir / 'report.json'}")
    print(f"Checkpoints: {run_dir / 'checkpoints'}")
    return run_dir


def _report(args: argparse.Namespace) -> int:
    from training.report import rerender

    print(f"Wrote {rerender(args.run_dir)}")
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


def _register(run_dir: Path) -> None:
    """Register a finished run in the service's database; a failure only warns."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.core.config import Settings
    from app.core.db import command_session
    from app.crud import register_run

    try:
        with command_session(Settings().db_url) as session:
            run = register_run(session, run_dir)
            print(f"Registered as report {run.id} in the service's database.")
    except (SQLAlchemyError, OSError) as exc:
        print(
            f"warning: run not registered in the database ({exc.__class__.__name__}: {exc}); "
            f"register it later with `maxmin-inspect import-run {run_dir}`",
            file=sys.stderr,
        )


def _db(args: argparse.Namespace) -> int:
    from app.core.config import Settings
    from app.core.db import head_revision, make_engine, upgrade

    settings = Settings()
    if args.db_command == "upgrade":
        upgrade(settings.db_url)
        print(f"Database at revision {head_revision()}.")
        return 0
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(settings.db_url)
    with engine.connect() as conn:
        print(MigrationContext.configure(conn).get_current_revision() or "none")
    engine.dispose()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from app.core.config import Settings

    settings = Settings()
    os.environ["WEB_CONCURRENCY"] = str(args.workers)
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its metrics here and /metrics sums them (prometheus_client's
        # multiprocess mode); emptied at start, as counters start from zero with the service.
        # Set before prometheus_client is imported here: it picks its mode at import, and this
        # process counts the shared model process's restarts.
        metrics_dir = settings.data_dir / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    import uvicorn

    from app.core.db import upgrade
    from app.core.observability import configure_logging

    configure_logging()
    upgrade(settings.db_url)  # the explicit start-up migration; the app itself only checks
    _first_admin_key(settings)
    host = _model_host(settings, args.workers)
    base = f"http://{args.host}:{args.port}"
    print(
        f"Inspector page: {base}/\nDashboard:      {base}/dashboard\n"
        f"Training page:  {base}/training\nAPI docs:       {base}/docs",
        flush=True,
    )
    try:
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level="info",
            access_log=False,  # the service logs each request itself, as JSON with its request id
        )
    finally:
        if host is not None:
            host.close()
    return 0


def _model_host(settings, workers: int):  # noqa: ANN001, ANN202
    """With several workers, one model process for all of them (``app.core.model_host``); its
    address goes to the workers through the environment. None when each worker keeps its own:
    one worker, models in the web process, ``MAXMIN_SHARED_MODELS=false`` (or ``auto`` on the
    CPU), or no run yet."""
    if workers < 2 or not settings.model_process or settings.shared_models == "false":
        return None
    if settings.shared_models == "auto":
        from training.engine import resolve_device

        try:
            if resolve_device(settings.device).type != "cuda":
                return None
        except ValueError:
            return None  # the workers report the bad device
    from prometheus_client import CollectorRegistry

    from app.core.db import make_engine, session_factory
    from app.core.model_host import ModelHost
    from app.core.model_process import ModelProcessFailed
    from app.core.observability import model_restarts_counter
    from app.main import find_run_dir

    engine = make_engine(settings.db_url)
    try:
        run_dir = find_run_dir(settings, session_factory(engine))
    finally:
        engine.dispose()
    if run_dir is None:
        return None  # the workers say in /readyz what to do
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) - workers)
    # Counted here, in the serve command; /metrics sums it with the workers' counts.
    restarts = model_restarts_counter(CollectorRegistry()).labels("shared")
    try:
        host = ModelHost(
            run_dir,
            settings.ab_models,
            settings.device,
            threads,
            on_restart=restarts.inc,
            parallel=settings.parallel_models,
        )
    except ModelProcessFailed as exc:
        print(
            f"warning: no shared model process ({exc}); each worker loads its own", file=sys.stderr
        )
        return None
    os.environ.update(host.env())
    print(f"Models:         {run_dir} on {host.device}, shared by {workers} workers", flush=True)
    return host


def _keys(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from app.core.config import Settings
    from app.core.db import command_session
    from app.core.security import create_key, revoke_key
    from app.tables import ApiKey

    with command_session(Settings().db_url) as session:
        if args.keys_command == "create":
            key, row = create_key(session, args.role, args.name)
            print(f"Created {row.role} key {row.id} for {row.name}. It is shown only now:")
            print(key)
        elif args.keys_command == "list":
            for row in session.execute(select(ApiKey).order_by(ApiKey.id)).scalars():
                state = "revoked" if row.revoked_at else "active"
                print(f"{row.id:>4}  {row.prefix}…  {row.role:<9}  {state:<7}  {row.name}")
        else:
            try:
                row = revoke_key(session, args.key)
            except LookupError as exc:
                raise ValueError(str(exc)) from None
            print(f"Revoked key {row.id} ({row.name}).")
    return 0


def _first_admin_key(settings) -> None:  # noqa: ANN001
    """On a database without keys, create an admin key and print it (only this once)."""
    from app.core.db import command_session
    from app.core.security import any_keys, create_key

    if not settings.auth_enabled:
        return
    with command_session(settings.db_url, migrate=False) as session:
        if not any_keys(session):
            key, _ = create_key(session, "admin", "first admin")
            print(
                "First start: created an admin key. Keep it; it is not shown again:\n"
                f"  {key}\nLog in with it at /login; create others with "
                "`maxmin-inspect keys create --role inspector --name NAME`.",
                flush=True,
            )


def _import_run(args: argparse.Namespace) -> int:
    from app.core.config import Settings
    from app.core.db import command_session
    from app.crud import NotFound, choose_to_serve, register_run

    try:
        with command_session(Settings().db_url) as session:
            run = register_run(session, args.run_dir)
            print(f"Registered {run.run_dir} as report {run.id}.")
            if args.serve:
                choose_to_serve(session, run)
                print("The service serves its models from now on.")
    except NotFound as exc:
        raise FileNotFoundError(str(exc)) from None
    return 0


COMMANDS = {
    "train": _train,
    "report": _report,
    "demo-data": _demo,
    "db": _db,
    "serve": _serve,
    "import-run": _import_run,
    "keys": _keys,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: clear messages and a non-zero exit on bad input."""
    from sqlalchemy.exc import SQLAlchemyError

    from training.checkpoint import CheckpointError
    from training.data import DataError

    args = get_args_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"maxmin-inspect {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        reason = getattr(exc, "orig", None) or exc
        print(f"maxmin-inspect {args.command}: database error: {reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
