"""PoC training runs started from the service: one at a time, each in a process of its own.

The engineer picks a dataset folder under the datasets directory (a setting) and the run's budget;
the service starts ``maxmin-inspect train`` in a new process session at a lower CPU priority, so
serving keeps the cores it needs, and records the job in the database. The trainer keeps a status
file in its run directory (stage, epochs, time left, outcome). Whichever worker is asked about a
job reads that file and, once the run has ended, records the outcome and registers the new run, so
a job's state is right whichever worker started it, and after a restart of the service too (the
training process runs on in its own session). Only names of folders directly under the datasets
directory are accepted: the page cannot be used to read other folders of the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
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

from app.crud.errors import NotFound
from app.crud.runs import register_run
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
    dataset: str,
    options: TrainingOptions,
    requested_by: str,
) -> TrainingJob:
    """Check the request, claim the single training slot, and start the trainer."""
    folder = _dataset_folder(datasets_dir, dataset)
    if busy := _running(session):
        raise TrainingRefused(409, f"training job {busy[0].id} is still running; one at a time")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", dataset)
    run_dir = (runs_dir / f"{stamp}-{safe}").resolve()
    job = TrainingJob(
        state="running",
        dataset=dataset,
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
        proc = _launch(folder, run_dir, device, options)
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
