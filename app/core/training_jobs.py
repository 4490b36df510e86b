"""PoC training runs started from the service: one at a time, each in a process of its own.

The engineer picks a dataset folder under the datasets directory (a setting) and the run's budget;
the service starts ``maxmin-inspect train`` in a new process session at a lower CPU priority, so
serving keeps the cores it needs, and records the job in the database. The trainer keeps a status
file in its run directory (stage, epochs, time left, outcome). Whichever worker is asked about a
job reads that file and, once the run has ended, records the outcome and registers the new run, so
a job's state is right whichever worker started it, and after a restart of the service too (the
training process runs on in its own session). Only names of folders directly under the datasets
directory are accepted: the page cannot be used to read other folders of the server.

A job can also train on the parts inspectors labelled, alone or merged with a dataset folder
(``inspected_manifest``): their images are exported beside the run with a manifest whose test split
holds only labelled parts the served models never trained on, so the new run is judged on the
line's own parts, not on what the champion already saw.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.core.storage import ImageStore
from app.crud.errors import NotFound
from app.crud.exports import LabelledImage, labelled_images, write_export
from app.crud.runs import champion, register_run
from app.tables import Run, TrainingJob
from inspectlib.datasets import DataError, scan_source
from inspectlib.progress import read_status

log = logging.getLogger("maxmin_inspect")
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")
STATUS_FILE = "status.json"
LOG_FILE = "train.log"


class TrainingRefused(Exception):
    """A training request the service will not start; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class TrainingOptions:
    models: list[str]
    epochs: int
    seeds: int
    size: int
    compress: bool = False  # also write the ONNX forms, for a service that runs them
    # also the pruned forms, keeping this fraction of the filters, for a service that runs those
    prune: float | None = None


def list_datasets(root: Path) -> list[dict[str, Any]]:
    """The dataset folders directly under ``root``: name, classes and images, or why unusable."""
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and DATASET_NAME.match(p.name)):
        try:
            entries, _ = scan_source(folder)
        except DataError as exc:
            out.append({"name": folder.name, "classes": [], "images": 0, "problem": str(exc)})
            continue
        classes = sorted({e.label for e in entries})
        row = {"name": folder.name, "classes": classes, "images": len(entries)}
        if len(classes) < 2:
            row["problem"] = "needs at least two class folders with images in it"
        out.append(row)
    return out


def _dataset_folder(root: Path, name: str) -> Path:
    if not DATASET_NAME.match(name):
        raise TrainingRefused(
            422,
            f"dataset {name!r} is not a folder name: use letters, digits, '.', '_', '-' or spaces",
        )
    folder = root / name
    if not folder.is_dir():
        raise TrainingRefused(422, f"no dataset folder named {name!r} in {root}")
    try:
        entries, _ = scan_source(folder)
    except DataError as exc:
        raise TrainingRefused(422, f"dataset {name!r}: {exc}") from None
    if len({e.label for e in entries}) < 2:
        raise TrainingRefused(
            422, f"dataset {name!r} needs at least two class folders with images in it"
        )
    return folder


TEST_SHARE = 0.3  # of each class's labelled parts the served models never trained on


def _trained_on(session: Session) -> set[str]:
    """The sha256 of every image the served run trained or validated on (from its split.csv)."""
    run = champion(session)
    if run is None or not (Path(run.run_dir) / "split.csv").is_file():
        return set()
    shas = set()
    with (Path(run.run_dir) / "split.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            path = Path(row.get("path") or "")
            if row.get("split") in ("train", "val") and path.is_file():
                shas.add(hashlib.sha256(path.read_bytes()).hexdigest())
    return shas


def inspected_manifest(
    session: Session, store: ImageStore, out: Path, folder: Path | None
) -> tuple[Path, dict[str, int]]:
    """Export the labelled parts into ``out`` with a manifest for the trainer: parts the served
    run trained on go to the training split, and of the others, per class, every third or so
    (by hash, so the choice is stable) to the test split; a dataset ``folder``, when given, is
    added to the training split. Returns the manifest and the counts per split."""
    rows = labelled_images(session)
    seen = _trained_on(session)
    fresh: dict[str, list[LabelledImage]] = {}
    for r in rows:
        if r.sha256 not in seen:
            fresh.setdefault(r.label, []).append(r)
    test: set[str] = set()
    for parts in fresh.values():
        parts = sorted(parts, key=lambda r: r.sha256)
        take = round(len(parts) * TEST_SHARE) if len(parts) >= 2 else 0
        test.update(r.sha256 for r in parts[: max(take, 1 if len(parts) >= 2 else 0)])
    written, _ = write_export(rows, store, out, lambda r: "test" if r.sha256 in test else "train")
    labels = {r.label for _, r in written}
    counts = {
        "inspected": len(written),
        "test": sum(1 for _, r in written if r.sha256 in test),
        "trained_on_before": sum(1 for _, r in written if r.sha256 in seen),
        "dataset": 0,
    }
    if folder is not None:
        entries, _ = scan_source(folder)
        with (out / "labels.csv").open("a", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            for e in entries:
                w.writerow([str(e.path.resolve()), e.label, *[""] * 7, "train"])
        labels |= {e.label for e in entries}
        counts["dataset"] = len(entries)
    if len(labels) < 2 or counts["test"] == 0:
        raise TrainingRefused(
            422,
            f"the inspected parts are too few to train and test on: {len(written)} labelled "
            f"part(s) in {len({r.label for _, r in written})} class(es), {counts['test']} of them "
            "never trained on for the test split; label more parts (two or more per class)",
        )
    return out / "labels.csv", counts


def alive(job: TrainingJob) -> bool:
    """Whether the job's training process still runs (a pid reused since does not count)."""
    if job.pid is None:
        return False
    try:
        proc = psutil.Process(job.pid)
        if job.process_started is not None and abs(proc.create_time() - job.process_started) > 0.5:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _running(session: Session) -> list[TrainingJob]:
    rows = session.execute(select(TrainingJob).where(TrainingJob.state == "running")).scalars()
    return [job for job in list(rows) if refresh(session, job).state == "running"]


def start(
    session: Session,
    sessions: sessionmaker,
    datasets_dir: Path,
    runs_dir: Path,
    device: str,
    dataset: str | None,
    options: TrainingOptions,
    requested_by: str,
    inspected: str = "none",
    store: ImageStore | None = None,
) -> TrainingJob:
    """Check the request, claim the single training slot, and start the trainer. ``inspected``:
    none (the dataset folder), alone (the labelled parts) or merged (both)."""
    folder = None
    if inspected != "alone":
        if not dataset:
            raise TrainingRefused(422, "choose a dataset folder")
        folder = _dataset_folder(datasets_dir, dataset)
    if busy := _running(session):
        raise TrainingRefused(409, f"training job {busy[0].id} is still running; one at a time")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = {"alone": "inspected parts", "merged": f"{dataset} + inspected parts"}.get(
        inspected, dataset or ""
    )
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    run_dir = (runs_dir / f"{stamp}-{safe}").resolve()
    source = folder
    if inspected in ("alone", "merged"):
        if store is None:
            raise ValueError("training on inspected parts needs the image store")
        data_dir = runs_dir.resolve() / f"{stamp}-{safe}.data"
        if data_dir.exists():
            raise TrainingRefused(409, f"{data_dir} exists already; try again in a second")
        try:
            source, _ = inspected_manifest(session, store, data_dir, folder)
        except TrainingRefused:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
    job = TrainingJob(
        state="running",
        dataset=name,
        run_dir=str(run_dir),
        options=asdict(options),
        requested_by=requested_by,
    )
    session.add(job)
    session.commit()
    # Two requests at once (two workers) may both have passed the check above: the older row
    # keeps the slot, the newer one withdraws.
    first = session.execute(
        select(TrainingJob.id).where(TrainingJob.state == "running").order_by(TrainingJob.id)
    ).scalars()
    first_id = next(iter(first), job.id)
    if first_id != job.id:
        session.delete(job)
        session.commit()
        raise TrainingRefused(409, f"training job {first_id} is still running; one at a time")
    try:
        proc = _launch(source, run_dir, device, options)
    except OSError as exc:
        _finish(session, job, "failed", f"the trainer could not start: {exc}")
        return job
    job.pid = proc.pid
    with contextlib.suppress(psutil.Error):
        job.process_started = psutil.Process(proc.pid).create_time()
    session.commit()
    session.refresh(job)
    if job.state == "cancelled":  # cancelled while it was being started
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    threading.Thread(
        target=_reap, args=(proc, sessions, job.id), name=f"training-job-{job.id}", daemon=True
    ).start()
    log.info("training job %s started: %s -> %s (pid %s)", job.id, folder, run_dir, proc.pid)
    return job


def _launch(folder: Path, run_dir: Path, device: str, options: TrainingOptions) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=False)
    cmd = [
        sys.executable,
        "-m",
        "training.cli",
        "train",
        str(folder.resolve()),
        "--out",
        str(run_dir),
        "--models",
        ",".join(options.models),
        "--epochs",
        str(options.epochs),
        "--seeds",
        str(options.seeds),
        "--size",
        str(options.size),
        "--device",
        device,
        "--status-file",
        str(run_dir / STATUS_FILE),
        "--quiet",
        "--nice",
        "10",
    ]
    if options.compress:
        cmd.append("--compress")
    if options.prune is not None:
        cmd += ["--prune", str(options.prune)]
    with open(run_dir / LOG_FILE, "wb") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives a restart of the service; cancelled as a group
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _reap(proc: subprocess.Popen, sessions: sessionmaker, job_id: int) -> None:
    """In the worker that started it: wait for the trainer, then record how it ended."""
    proc.wait()
    try:
        with sessions() as session:
            job = session.get(TrainingJob, job_id)
            if job is not None:
                refresh(session, job, exit_code=proc.returncode)
    except Exception:  # noqa: BLE001 - the next reader records it instead
        log.exception("could not record the end of training job %s", job_id)


def refresh(session: Session, job: TrainingJob, exit_code: int | None = None) -> TrainingJob:
    """Bring a running job's row up to date with its status file and process."""
    if job.state != "running" or (job.pid is None and _young(job)):
        return job  # ended already, or its process is being started right now
    status = read_status(Path(job.run_dir) / STATUS_FILE) or {}
    state = status.get("state")
    if state == "done":
        try:
            run = _register(session, Path(job.run_dir), job.requested_by)
        except (NotFound, OSError, ValueError) as exc:
            _finish(session, job, "failed", f"the run finished but cannot be registered: {exc}")
        else:
            _finish(session, job, "done", run.verdict, run_id=run.id)
    elif state == "failed":
        _finish(session, job, "failed", status.get("message") or "training failed")
    elif not alive(job):
        code = f" (exit code {exit_code})" if exit_code is not None else ""
        tail = _log_tail(Path(job.run_dir) / LOG_FILE)
        _finish(
            session,
            job,
            "failed",
            f"the training process ended without finishing{code}" + (f": {tail}" if tail else ""),
        )
    return job


def _register(session: Session, run_dir: Path, actor: str | None = None) -> Run:
    try:
        return register_run(session, run_dir, actor)
    except IntegrityError:  # another worker registered it at the same moment
        session.rollback()
        return session.execute(select(Run).where(Run.run_dir == str(run_dir))).scalar_one()


def _young(job: TrainingJob) -> bool:
    """A row whose process is being started right now (no pid yet)."""
    created = job.created_at
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return (datetime.now(UTC) - created).total_seconds() < 30


def _finish(session: Session, job: TrainingJob, state: str, message: str, **more: Any) -> bool:
    """Record how a running job ended; False when another worker or a cancel got there first."""
    done = session.execute(
        update(TrainingJob)
        .where(TrainingJob.id == job.id, TrainingJob.state == "running")
        .values(state=state, message=message, finished_at=datetime.now(UTC), **more)
    )
    session.commit()
    session.refresh(job)
    if done.rowcount:
        log.info("training job %s %s: %s", job.id, state, message)
    return bool(done.rowcount)


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_bytes()[-4000:].decode("utf-8", "replace")
    except OSError:
        return ""
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def cancel(session: Session, job: TrainingJob, who: str) -> TrainingJob:
    """Mark a running job cancelled, then stop its trainer (the whole process group)."""
    refresh(session, job)
    if job.state != "running" or not _finish(session, job, "cancelled", f"cancelled by {who}"):
        raise TrainingRefused(409, f"training job {job.id} is not running (it is {job.state})")
    if alive(job):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive(job) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(job):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job.pid, signal.SIGKILL)
    return job


def progress(job: TrainingJob) -> dict[str, Any] | None:
    """A running job's stage and epochs from its status file."""
    if job.state != "running":
        return None
    status = read_status(Path(job.run_dir) / STATUS_FILE) or {}
    keys = ("epochs_done", "epochs_total", "detail", "eta_seconds", "updated_at")
    return {k: status.get(k) for k in keys} | {"stage": status.get("state") or "starting"}
