"""The service's commands: db, serve, keys and import-run, and registering a trained run."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from inspectlib.commands import positive_int

Command = Callable[[argparse.Namespace], int]


def add_commands(sub: argparse._SubParsersAction) -> dict[str, Command]:
    """Add db, serve, keys and import-run to ``sub``; returns their handlers by name."""
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
    s.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
    s.add_argument(
        "--workers",
        type=worker_count,
        default="auto",
        help=f"web processes; auto (the default): one per usable core, at most {MAX_AUTO_WORKERS}",
    )

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
    ke = k_sub.add_parser(
        "end-sessions",
        help="log a key out of every browser (the key itself keeps working)",
    )
    ke.add_argument("key", help="the id or the prefix shown by 'keys list'")

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
    pr = sub.add_parser(
        "predict",
        help="classify folders or files of images offline, as the service would",
        description="Classify images with a run's A/B models, with the service's preprocessing "
        "and decision rule; write a CSV of the file, each model's label and confidence, and the "
        "decision. Unreadable files are listed, not fatal.",
    )
    pr.add_argument("run_dir", type=Path, help="a run directory written by 'train'")
    pr.add_argument("paths", type=Path, nargs="+", help="image files or folders (searched deeply)")
    pr.add_argument("--csv", type=Path, default=None, help="write here (default: standard output)")
    pr.add_argument(
        "--models", default=None, help="comma-separated (default: MAXMIN_AB_MODELS, the A/B pair)"
    )
    pr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    pr.add_argument("--batch-size", type=positive_int, default=64)
    ex = sub.add_parser(
        "export-labels",
        help="write the parts inspectors labelled as a training folder",
        description="Copy every labelled image once (the latest label wins) into OUT/<label>/, "
        "with OUT/labels.csv listing each file, its label, who labelled it and when, and which "
        "model versions classified it. `maxmin-inspect train OUT` trains on the folder, "
        "`train OUT/labels.csv` on the manifest.",
    )
    ex.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    ex.add_argument("--since", type=datetime.fromisoformat, default=None, help="labelled since")
    ex.add_argument("--source", default=None, help="only parts from this line or station")
    return {
        "export-labels": _export_labels,
        "db": _db,
        "serve": _serve,
        "keys": _keys,
        "import-run": _import_run,
        "predict": _predict,
    }


def _export_labels(args: argparse.Namespace) -> int:

    from app.core.config import Settings
    from app.core.db import command_session
    from app.crud.exports import labelled_images, write_export

    settings = Settings()
    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: export into a new folder")
    store = settings.open_store()
    with command_session(settings.db_url) as session:
        rows = labelled_images(session, args.since, args.source)
    written, missing = write_export(rows, store, out)
    labels = sorted({r.label for _, r in written})
    print(f"Exported {len(written)} labelled image(s) in {len(labels)} class(es) to {out}.")
    if missing:
        print(f"warning: {len(missing)} image file(s) missing from the store", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import csv

    import numpy as np
    from tqdm.auto import tqdm

    from app.core.config import Settings
    from app.core.inference import Classifier, ModelsUnavailable
    from inspectlib.decision import decide
    from inspectlib.imaging import IMAGE_SUFFIXES, ImageError

    settings = Settings()
    names = [m.strip() for m in args.models.split(",")] if args.models else settings.ab_models
    files: list[Path] = []
    for path in args.paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += [p for p in found if p.is_file()]
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither an image file nor a folder")
    try:
        classifier = Classifier(args.run_dir, names, args.device)
    except ModelsUnavailable as exc:
        raise ValueError(str(exc)) from None
    out = args.csv.open("w", newline="", encoding="utf-8") if args.csv else sys.stdout
    writer = csv.writer(out)
    writer.writerow(
        [
            "file",
            *[f"{n}_{c}" for n in names for c in ("label", "confidence")],
            "decision",
            "reason",
        ]
    )
    unreadable: list[tuple[Path, str]] = []
    counts: dict[str, int] = {}
    progress = tqdm(total=len(files), unit="image", disable=None, file=sys.stderr)
    for start in range(0, len(files), args.batch_size):
        batch, arrays = [], []
        for path in files[start : start + args.batch_size]:
            try:
                arrays.append(classifier.decode(path.read_bytes(), settings.max_image_pixels).array)
                batch.append(path)
            except (ImageError, OSError) as exc:
                unreadable.append((path, str(exc)))
        if batch:
            results = classifier.classify(np.stack(arrays))
            for i, path in enumerate(batch):
                answers = {}
                for name in names:
                    p = results[name][0][i]
                    answers[name] = (classifier.classes[int(p.argmax())], float(p.max()))
                d = decide(answers, classifier.thresholds, classifier.good_class)
                counts[d.action] = counts.get(d.action, 0) + 1
                cells = [x for label, conf in answers.values() for x in (label, f"{conf:.4f}")]
                writer.writerow([str(path), *cells, d.action, d.reason])
        progress.update(min(args.batch_size, len(files) - start))
    progress.close()
    if args.csv:
        out.close()
    done = ", ".join(f"{n} {a}" for a, n in sorted(counts.items())) or "none"
    print(f"Classified {sum(counts.values())} image(s): {done}.", file=sys.stderr)
    for path, why in unreadable:
        print(f"unreadable: {path}: {why}", file=sys.stderr)
    return 0 if counts or not files else 2


def register_after_train(args: argparse.Namespace, run_dir: Path) -> None:
    """Register a run ``train`` just finished in the service's database (unless
    ``--no-register``); a failure only warns, the run stays on disk."""
    if args.no_register:
        return
    from sqlalchemy.exc import SQLAlchemyError

    from app.core.config import Settings
    from app.core.db import command_session
    from app.crud.runs import register_run

    try:
        with command_session(Settings().db_url) as session:
            run = register_run(session, run_dir, actor="maxmin-inspect train")
            print(f"Registered as report {run.id} in the service's database.")
            if run.challenger_since is not None:
                print("It runs in shadow as the challenger until an admin promotes it.")
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


# Each worker holds its own models (on the CPU) and decoding budget: past a few, more cost memory
# and gain little, since they share the cores with the models.
MAX_AUTO_WORKERS = 4


def worker_count(text: str) -> int:
    """``--workers``: a whole number, or ``auto`` for one web process per usable core (at most
    ``MAX_AUTO_WORKERS``): one process's event loop and interpreter lock cannot keep two cores
    busy with requests (``bench/serve_bench.py --workers``)."""
    if text.strip().lower() == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(1, min(cores, MAX_AUTO_WORKERS))
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; give a number of workers or auto") from None


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

    from app.core import listener
    from app.core.db import upgrade
    from app.core.observability import configure_logging, log_config

    server_args = dict(
        app="app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="info",
        log_config=log_config(),  # applied in each worker: their JSON access logs
        access_log=False,  # the service logs each request itself, as JSON with its request id
    )
    # Several workers: a listening socket each where the kernel balances them (app/core/listener).
    own_sockets = args.workers > 1 and listener.supported(args.port)
    if own_sockets:
        try:
            listener.check_free(args.host, args.port)
        except OSError as exc:
            print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
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
        if own_sockets:
            listener.run_workers(uvicorn.Config(**server_args), args.workers)
        else:
            uvicorn.run(**server_args)
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
        from inspectlib.device import resolve_device

        try:
            if resolve_device(settings.device).type != "cuda":
                return None
        except ValueError:
            return None  # the workers report the bad device
    from prometheus_client import CollectorRegistry

    from app.core.db import make_engine, session_factory
    from app.core.model_host import ModelHost
    from app.core.model_process import ModelProcessFailed, ModelsToLoad
    from app.core.observability import model_restarts_counter
    from app.core.serving import find_run_dir

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
        models = ModelsToLoad(
            run_dir,
            tuple(settings.ab_models),
            settings.device,
            threads,
            settings.parallel_models,
            settings.runtime,
            settings.model_form,
        )
        host = ModelHost(models, on_restart=restarts.inc)
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
    from app.core.security import create_key, end_all_sessions, revoke_key
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
        elif args.keys_command == "end-sessions":
            try:
                row, n = end_all_sessions(session, args.key)
            except LookupError as exc:
                raise ValueError(str(exc)) from None
            print(f"Ended {n} browser session(s) of key {row.id} ({row.name}).")
        else:
            try:
                row = revoke_key(session, args.key)
            except LookupError as exc:
                raise ValueError(str(exc)) from None
            print(f"Revoked key {row.id} ({row.name}); its browser sessions ended with it.")
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
    from app.crud.errors import NotFound
    from app.crud.runs import choose_to_serve, register_run

    try:
        with command_session(Settings().db_url) as session:
            run = register_run(session, args.run_dir, actor="maxmin-inspect import-run")
            print(f"Registered {run.run_dir} as report {run.id}.")
            if args.serve:
                choose_to_serve(session, run, actor="maxmin-inspect import-run --serve")
                print("The service serves its models from now on.")
            elif run.challenger_since is not None:
                print("It runs in shadow as the challenger until an admin promotes it.")
    except NotFound as exc:
        raise FileNotFoundError(str(exc)) from None
    return 0
