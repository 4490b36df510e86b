"""The registered PoC reports: JSON for programs, the report page for browsers."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from app.api.deps import AdminDep, ManagerDep, RowId, SessionDep, SettingsDep
from app.api.routes.runs import switchable
from app.crud.errors import as_utc
from app.crud.runs import choose_to_serve, list_runs
from app.schemas import RunPublic, RunsPublic, RunSummary
from app.tables import Run

router = APIRouter(tags=["reports"])


def _serving(request: Request) -> str | None:
    classifier = request.app.state.models.classifier
    return str(classifier.run_dir.resolve()) if classifier is not None else None


def _summary(run: Run, serving: str | None) -> dict:
    return {
        "id": run.id,
        "run_dir": run.run_dir,
        "created_at": as_utc(run.created_at),
        "registered_at": as_utc(run.registered_at),
        "served_at": as_utc(run.served_at),
        "challenger_since": as_utc(run.challenger_since),
        "serving": serving == str(Path(run.run_dir).resolve()),
        "verdict": run.verdict,
        "model_versions": run.model_versions,
        "report_url": f"/reports/{run.id}",
    }


@router.get("/reports", response_model=RunsPublic)
def read_reports(_: ManagerDep, request: Request, session: SessionDep) -> RunsPublic:
    """Registered training runs, newest first; `serving` marks the run whose models answer."""
    runs = list_runs(session)
    data = [RunSummary(**_summary(r, _serving(request))) for r in runs]
    return RunsPublic(data=data, count=len(data))


@router.post(
    "/reports/{run_id}/serve",
    response_model=RunSummary,
    status_code=202,
    responses={404: {"description": "unknown report"}, 409: {"description": "pinned"}},
)
def serve_report(
    who: AdminDep, run_id: RowId, request: Request, session: SessionDep, settings: SettingsDep
) -> RunSummary:
    """Serve this run's models: every worker loads them beside the current ones and switches
    within `MAXMIN_RELOAD_SECONDS`, without a restart; requests in flight finish on the models
    they started with. `/readyz` names the run being served."""
    run = switchable(session.get(Run, run_id), run_id, settings)
    choose_to_serve(session, run, who.name)
    return RunSummary(**_summary(run, _serving(request)))


@router.get(
    "/reports/{run_id}",
    response_model=RunPublic,
    responses={200: {"content": {"text/html": {}}}, 404: {"description": "unknown report"}},
)
def read_report(  # noqa: ANN201
    _: ManagerDep,
    run_id: RowId,
    request: Request,
    session: SessionDep,
    format: str | None = None,  # noqa: A002
):
    """The full report.json; a browser (Accept: text/html) or ?format=html gets the report page."""
    run = session.get(Run, run_id)
    if run is None:
        raise HTTPException(404, detail=f"report {run_id} not found")
    accept = request.headers.get("accept", "")
    if format == "html" or (format is None and "text/html" in accept):
        page = Path(run.run_dir) / "report.html"
        if not page.is_file():
            raise HTTPException(
                404,
                detail=f"report page {page} is missing; re-render it with "
                "`maxmin-inspect report RUN_DIR`",
            )
        return HTMLResponse(page.read_text(encoding="utf-8"))
    return RunPublic(**_summary(run, _serving(request)), report=run.report)
