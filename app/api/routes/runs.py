"""Champion and challenger: the evidence from the line, promote, roll back, and the run history.

The champion is the run whose models answer; the challenger's models answer every image in shadow
(stored, not returned). ``GET /runs/challenger`` compares them on the parts inspectors labelled
since the challenger started and says whether the promotion rule is met (docs/service.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import case, func, select

from app.api.deps import AdminDep, ManagerDep, RowId, SessionDep, SettingsDep
from app.crud.errors import as_utc
from app.crud.live_ab import challenger_stats
from app.crud.runs import (
    challenger,
    champion,
    make_challenger,
    promote,
    register_run,
    rollback,
    rollback_target,
    run_events,
    withdraw_challenger,
)
from app.tables import ModelOutput, Prediction, Run
from inspectlib.decision import RetargetError, retarget_run

router = APIRouter(tags=["champion and challenger"])

RESPONSES = {
    404: {"description": "unknown run"},
    409: {"description": "not possible in the current state (the detail says why)"},
}


_RUN = {
    "id": 7,
    "run_dir": "/srv/maxmin/runs/20261130-line3",
    "created_at": "2026-11-30T06:10:00Z",
    "model_versions": {"baseline": "baseline-seed1.safetensors:3f2a9c1d0b7e"},
    "report_url": "/reports/7",
}
CHALLENGER_EXAMPLE = {
    "champion": {**_RUN, "id": 6, "report_url": "/reports/6"},
    "challenger": _RUN,
    "shadow": {"enabled": True, "loaded": True, "problem": None},
    "rollback_to": None,
    "evidence": {
        "challenger_run_id": 7,
        "since": "2026-11-30T06:20:00Z",
        "labelled": 412,
        "models": {
            "maxmin": {
                "parts": 412,
                "champion_accuracy": {"value": 0.951, "low": 0.926, "high": 0.968},
                "challenger_accuracy": {"value": 0.961, "low": 0.938, "high": 0.976},
                "only_champion_correct": 6,
                "only_challenger_correct": 10,
                "mcnemar_p_value": 0.454,
            }
        },
        "rates": {
            "escape_rate": {
                "champion": {"value": 0.012, "low": 0.004, "high": 0.035},
                "challenger": {"value": 0.008, "low": 0.002, "high": 0.029},
            },
            "false_reject_rate": {
                "champion": {"value": 0.031, "low": 0.017, "high": 0.056},
                "challenger": {"value": 0.027, "low": 0.014, "high": 0.051},
            },
        },
        "rule": {
            "on": "escape rate",
            "min_labelled": 200,
            "margin": 0.01,
            "difference": {"difference": -0.004, "upper": 0.006, "parts": 251},
            "ready": True,
            "verdict": "ready to promote: on 412 labelled parts the challenger's escape rate is "
            "at most 0.6 points above the champion's at 95 % confidence (margin 1.0 points), "
            "and no model is less accurate",
        },
    },
}
HISTORY_EXAMPLE = {
    "served": [
        {
            "run": _RUN,
            "action": "promote",
            "by": "ole (engineer)",
            "from": "2026-11-30T09:00:00Z",
            "until": None,
            "previous_run_id": 6,
            "models": {"maxmin": {"predictions": 5210, "labelled": 140, "accuracy": 0.964}},
        }
    ],
    "events": [
        {
            "run_id": 7,
            "action": "challenge",
            "by": "maxmin-inspect train",
            "at": "2026-11-30T06:20:00Z",
            "note": "registered while another run serves",
        }
    ],
}


def _example(body: dict) -> dict:
    return {200: {"content": {"application/json": {"example": body}}}}


def switchable(run: Run | None, run_id: int | None, settings) -> Run:  # noqa: ANN001
    """``run`` if the service may switch to it now; else the 404 or 409 that says why not."""
    if run is None:
        raise HTTPException(404, detail=f"run {run_id} not found")
    if settings.run_dir is not None:
        raise HTTPException(
            409, detail=f"MAXMIN_RUN_DIR pins the served run to {settings.run_dir}; unset it first"
        )
    if settings.reload_seconds <= 0:
        raise HTTPException(
            409, detail="MAXMIN_RELOAD_SECONDS is 0: the service switches runs only at a restart"
        )
    if not (Path(run.run_dir) / "report.json").is_file():
        raise HTTPException(409, detail=f"run directory {run.run_dir} is missing or incomplete")
    return run


def _or_409(action, *args):  # noqa: ANN001, ANN002, ANN202
    """``action(*args)``, its ValueError (a state that does not allow it) answered as 409."""
    try:
        return action(*args)
    except ValueError as exc:
        raise HTTPException(409, detail=str(exc)) from None


def _brief(run: Run | None) -> dict | None:
    if run is None:
        return None
    return {
        "id": run.id,
        "run_dir": run.run_dir,
        "created_at": as_utc(run.created_at),
        "model_versions": run.model_versions,
        "report_url": f"/reports/{run.id}",
    }


def comparison(request: Request, session, settings) -> dict:  # noqa: ANN001
    """The champion, the challenger, and the evidence (for the API and the dashboard)."""
    champ, chal = champion(session), challenger(session)
    served = request.app.state.models.classifier
    shadow = request.app.state.shadow
    body = {
        "champion": _brief(champ),
        "challenger": _brief(chal),
        "shadow": {
            "enabled": settings.shadow,
            "loaded": shadow.classifier is not None,
            "problem": shadow.models_error or shadow.reload_error,
        },
        "rollback_to": _brief(rollback_target(session)),
        "evidence": None,
    }
    if chal is not None and chal.challenger_since is not None:
        versions = {n: m.version for n, m in served.models.items()} if served else None
        good = served.good_class if served else None
        body["evidence"] = challenger_stats(
            session, chal, versions, good, settings.promote_min_labelled, settings.promote_margin
        )
    return body


@router.get("/runs/challenger", responses=_example(CHALLENGER_EXAMPLE))
def read_challenger(_: ManagerDep, request: Request, session: SessionDep, settings: SettingsDep):  # noqa: ANN201
    """The champion against the challenger on the parts labelled since the challenger started:
    paired accuracy per model with McNemar's test, escape and false-reject rates with intervals,
    and whether the promotion rule is met (`evidence.rule.ready`)."""
    return comparison(request, session, settings)


@router.post("/runs/{run_id}/promote", status_code=202, responses=RESPONSES)
def promote_run(who: AdminDep, run_id: RowId, session: SessionDep, settings: SettingsDep) -> dict:
    """The challenger becomes the champion: every worker switches to its models within
    `MAXMIN_RELOAD_SECONDS`. Recorded with who and when; `POST /runs/rollback` undoes it."""
    run = switchable(session.get(Run, run_id), run_id, settings)
    _or_409(promote, session, run, who.name)
    return {"champion": _brief(run)}


@router.post("/runs/rollback", status_code=202, responses=RESPONSES)
def rollback_run(who: AdminDep, session: SessionDep, settings: SettingsDep) -> dict:
    """Serve the previous champion again (recorded with who and when)."""
    target = rollback_target(session)
    if target is None:
        raise HTTPException(409, detail="no earlier champion to roll back to")
    switchable(target, target.id, settings)
    rollback(session, who.name)
    return {"champion": _brief(target)}


@router.post("/runs/{run_id}/challenge", status_code=202, responses=RESPONSES)
def challenge_run(who: AdminDep, run_id: RowId, session: SessionDep, settings: SettingsDep) -> dict:
    """Put this run in shadow as the challenger (replacing any other)."""
    run = switchable(session.get(Run, run_id), run_id, settings)
    _or_409(make_challenger, session, run, who.name)
    return {"challenger": _brief(run)}


@router.post("/runs/{run_id}/withdraw", status_code=202, responses=RESPONSES)
def withdraw_run(who: AdminDep, run_id: RowId, session: SessionDep) -> dict:
    """Take the challenger out of shadow."""
    run = session.get(Run, run_id)
    if run is None:
        raise HTTPException(404, detail=f"run {run_id} not found")
    _or_409(withdraw_challenger, session, run, who.name)
    return {"withdrawn": _brief(run)}


class OperatingTarget(BaseModel):
    max_escape_rate: float = Field(
        ge=0.0,
        le=1.0,
        description="the escape rate (with the run's good class) or the error rate among "
        "accepted parts that each model's threshold keeps on the validation split",
        examples=[0.01],
    )


@router.put("/runs/{run_id}/operating-point", responses=RESPONSES)
def set_operating_point(
    who: AdminDep, run_id: RowId, body: OperatingTarget, session: SessionDep
) -> dict:
    """Choose the run's confidence thresholds again for another target, from the validation
    answers its training kept; the service applies them within `MAXMIN_RELOAD_SECONDS` (a served
    run or the challenger alike). The report (JSON and page) shows the new point and who set it."""
    run = session.get(Run, run_id)
    if run is None:
        raise HTTPException(404, detail=f"run {run_id} not found")
    try:
        points = retarget_run(Path(run.run_dir), body.max_escape_rate, who.name)
    except RetargetError as exc:
        raise HTTPException(409, detail=str(exc)) from None
    except OSError as exc:
        raise HTTPException(409, detail=f"cannot rewrite the run's report: {exc}") from None
    register_run(session, Path(run.run_dir))  # the database's copy of the report follows
    # The report page is rendered by the trainer's code, in a process of its own (the service
    # does not import the trainer).
    rendered = subprocess.run(
        [sys.executable, "-m", "training.cli", "report", run.run_dir],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return {
        "run_id": run.id,
        "target": body.max_escape_rate,
        "thresholds": {name: p["threshold"] for name, p in points.items()},
        "validation": {name: p["validation"] for name, p in points.items()},
        "report_page": "updated"
        if rendered.returncode == 0
        else f"not updated: {rendered.stderr.strip()[-300:]}",
    }


def history(session) -> tuple[list[dict], list[dict]]:  # noqa: ANN001
    """Every run that served, each period from when it took over to when the next did, with its
    live figures in that period: predictions, labelled parts, and each model's accuracy on them."""
    events = run_events(session)
    served = [e for e in events if e.action in ("serve", "promote", "rollback")]
    periods = []
    for i, e in enumerate(served):
        until = served[i + 1].created_at if i + 1 < len(served) else None
        run = session.get(Run, e.run_id)
        versions = set((run.model_versions or {}).values()) if run else set()
        query = (
            select(
                ModelOutput.model_name,
                func.count(ModelOutput.id),
                func.count(Prediction.label),
                func.sum(case((ModelOutput.label == Prediction.label, 1), else_=0)),
            )
            .join(Prediction, Prediction.id == ModelOutput.prediction_id)
            .where(ModelOutput.model_version.in_(versions), Prediction.created_at >= e.created_at)
            .group_by(ModelOutput.model_name)
        )
        if until is not None:
            query = query.where(Prediction.created_at < until)
        figures = {
            name: {
                "predictions": total,
                "labelled": labelled,
                "accuracy": (correct or 0) / labelled if labelled else None,
            }
            for name, total, labelled, correct in session.execute(query)
        }
        periods.append(
            {
                "run": _brief(run),
                "action": e.action,
                "by": e.actor,
                "from": as_utc(e.created_at),
                "until": as_utc(until),
                "previous_run_id": e.previous_run_id,
                "models": figures,
            }
        )
    others = [
        {
            "run_id": e.run_id,
            "action": e.action,
            "by": e.actor,
            "at": as_utc(e.created_at),
            "note": e.note,
        }
        for e in events
    ]
    return list(reversed(periods)), others


@router.get("/runs/history", responses=_example(HISTORY_EXAMPLE))
def read_history(_: ManagerDep, session: SessionDep) -> dict:
    """Every run that served (newest first) with its dates, who chose it, and its live figures;
    and every champion and challenger event."""
    periods, events = history(session)
    return {"served": periods, "events": events}
