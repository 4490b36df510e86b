"""The registry of training runs: registering a run directory, and which run is served."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crud.errors import NotFound
from app.tables import Run, utcnow


def register_run(session: Session, run_dir: Path) -> Run:
    """Record a finished training run (its report and model versions); re-registering updates it."""
    run_dir = Path(run_dir).resolve()
    src = run_dir / "report.json"
    if not src.is_file():
        raise NotFound(f"{src} not found: is {run_dir} a run directory written by `train`?")
    try:
        report = json.loads(src.read_text())
        versions = {}
        for name, m in report["models"].items():
            ckpt = m.get("checkpoint")
            sha = next((c["weights_sha256"] for c in m["checkpoints"] if c["path"] == ckpt), "")
            versions[name] = f"{Path(ckpt).name}:{sha[:12]}" if ckpt else "none"
        created = datetime.fromisoformat(report["created_at"])
        fingerprint, verdict = report["dataset"]["fingerprint"], report["verdict"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{src} is not a PoC report this version understands: {exc}") from None
    run = session.execute(select(Run).where(Run.run_dir == str(run_dir))).scalar_one_or_none()
    if run is None:
        run = Run(run_dir=str(run_dir))
        session.add(run)
    run.created_at = created
    run.data_fingerprint = fingerprint
    run.verdict = verdict
    run.model_versions = versions
    run.report = report
    run.registered_at = utcnow()
    session.commit()
    return run


def list_runs(session: Session, limit: int | None = None) -> list[Run]:
    """Registered runs, newest first."""
    query = select(Run).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)
    return list(session.execute(query).scalars())


def latest_run(session: Session) -> Run | None:
    runs = list_runs(session, limit=1)
    return runs[0] if runs else None


def serving_run(session: Session) -> Run | None:
    """The run the service serves: the one most recently chosen to serve; before any choice, the
    newest registered (which the service then records as chosen, see ``keep_serving``)."""
    query = select(Run).order_by(
        Run.served_at.is_(None), Run.served_at.desc(), Run.registered_at.desc(), Run.id.desc()
    )
    return session.execute(query.limit(1)).scalars().first()


def choose_to_serve(session: Session, run: Run) -> Run:
    """Make ``run`` the one the service serves; every worker switches to it within seconds."""
    run.served_at = utcnow()
    session.commit()
    return run


def keep_serving(session: Session, run_dir: Path) -> None:
    """Record the run served by default (no run chosen yet) as chosen, so that a run registered
    later, say a quick experiment, does not replace it until someone chooses it."""
    if session.execute(select(Run.id).where(Run.served_at.is_not(None)).limit(1)).first():
        return
    run = session.execute(
        select(Run).where(Run.run_dir == str(Path(run_dir).resolve()))
    ).scalar_one_or_none()
    if run is not None:
        choose_to_serve(session, run)
