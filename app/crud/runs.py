"""The registry of training runs: registering a run directory, which run is served (the champion)
and which answers in shadow (the challenger), and the events that changed them.

A run registered while another is served becomes the challenger: it answers every image in shadow
(stored, not returned) until an admin promotes it. Serving, promoting and rolling back are recorded
as ``RunEvent`` rows with who and when, so a rollback knows where to go back to."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crud.errors import NotFound
from app.tables import Run, RunEvent, utcnow


def register_run(session: Session, run_dir: Path, actor: str | None = None) -> Run:
    """Record a finished training run (its report and model versions); re-registering updates it.
    A new run registered while another is served becomes the challenger."""
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
    new = run is None
    if run is None:
        run = Run(run_dir=str(run_dir))
        session.add(run)
    run.created_at = created
    run.data_fingerprint = fingerprint
    run.verdict = verdict
    run.model_versions = versions
    run.report = report
    run.registered_at = utcnow()
    session.flush()
    if new and champion(session) is not None:
        _make_challenger(session, run, actor, "registered while another run serves")
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


def champion(session: Session) -> Run | None:
    """The run chosen to serve; None before any choice."""
    query = select(Run).where(Run.served_at.is_not(None)).order_by(Run.served_at.desc(), Run.id)
    return session.execute(query.limit(1)).scalars().first()


def challenger(session: Session) -> Run | None:
    """The run answering in shadow, if any (at most one)."""
    query = select(Run).where(Run.challenger_since.is_not(None))
    return session.execute(query.order_by(Run.challenger_since.desc()).limit(1)).scalars().first()


def _record(
    session: Session,
    run: Run,
    action: str,
    actor: str | None,
    previous: Run | None = None,
    note: str | None = None,
) -> None:
    session.add(
        RunEvent(
            run_id=run.id,
            action=action,
            actor=actor,
            previous_run_id=previous.id if previous is not None else None,
            note=note,
            created_at=utcnow(),
        )
    )


def _make_challenger(session: Session, run: Run, actor: str | None, note: str) -> None:
    for other in session.execute(select(Run).where(Run.challenger_since.is_not(None))).scalars():
        if other.id != run.id:
            other.challenger_since = None
            _record(session, other, "withdraw", actor, note=f"replaced by run {run.id}")
    run.challenger_since = utcnow()
    _record(session, run, "challenge", actor, note=note)


def make_challenger(session: Session, run: Run, actor: str | None) -> Run:
    """Put ``run`` in shadow beside the champion (replacing any other challenger)."""
    current = champion(session)
    if current is not None and current.id == run.id:
        raise ValueError(f"run {run.id} is the champion: it cannot also be the challenger")
    _make_challenger(session, run, actor, "chosen by an admin")
    session.commit()
    return run


def withdraw_challenger(session: Session, run: Run, actor: str | None) -> Run:
    """Take ``run`` out of shadow."""
    if run.challenger_since is None:
        raise ValueError(f"run {run.id} is not the challenger")
    run.challenger_since = None
    _record(session, run, "withdraw", actor)
    session.commit()
    return run


def choose_to_serve(
    session: Session, run: Run, actor: str | None = None, action: str = "serve"
) -> Run:
    """Make ``run`` the one the service serves (the champion); every worker switches to it within
    seconds. Recorded with who, when and which run served before."""
    previous = champion(session)
    run.served_at = utcnow()
    if run.challenger_since is not None:
        run.challenger_since = None  # a champion does not also answer in shadow
    if previous is None or previous.id != run.id:
        _record(session, run, action, actor, previous)
    session.commit()
    return run


def promote(session: Session, run: Run, actor: str | None) -> Run:
    """The challenger becomes the champion."""
    if run.challenger_since is None:
        raise ValueError(f"run {run.id} is not the challenger: only the challenger is promoted")
    return choose_to_serve(session, run, actor, "promote")


def rollback_target(session: Session) -> Run | None:
    """The champion before the current one: the run that served when the current champion took
    over."""
    current = champion(session)
    if current is None:
        return None
    event = session.execute(
        select(RunEvent)
        .where(
            RunEvent.run_id == current.id,
            RunEvent.action.in_(("serve", "promote", "rollback")),
        )
        .order_by(RunEvent.created_at.desc(), RunEvent.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if event is None or event.previous_run_id is None:
        return None
    return session.get(Run, event.previous_run_id)


def rollback(session: Session, actor: str | None) -> Run:
    """Serve the previous champion again."""
    target = rollback_target(session)
    if target is None:
        raise ValueError("no earlier champion to roll back to")
    return choose_to_serve(session, target, actor, "rollback")


def run_events(session: Session, limit: int = 500) -> list[RunEvent]:
    """The run history, oldest first."""
    query = select(RunEvent).order_by(RunEvent.created_at, RunEvent.id).limit(limit)
    return list(session.execute(query).scalars())


def keep_serving(session: Session, run_dir: Path) -> None:
    """Record the run served by default (no run chosen yet) as chosen, so that a run registered
    later, say a quick experiment, does not replace it until someone chooses it."""
    if session.execute(select(Run.id).where(Run.served_at.is_not(None)).limit(1)).first():
        return
    run = session.execute(
        select(Run).where(Run.run_dir == str(Path(run_dir).resolve()))
    ).scalar_one_or_none()
    if run is not None:
        choose_to_serve(session, run, actor="service (the newest run, served by default)")
