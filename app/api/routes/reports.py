"""The registered PoC reports: JSON for programs, the report page for browsers."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from app.api.deps import ManagerDep, RowId, SessionDep
from app.crud import as_utc, list_runs
from app.schemas import RunPublic, RunsPublic, RunSummary
from app.tables import Run

router = APIRouter(tags=["reports"])


def _summary(run: Run) -> dict:
    return {
        "id": run.id,
        "run_dir": run.run_dir,
        "created_at": as_utc(run.created_at),
        "registered_at": as_utc(run.registered_at),
        "verdict": run.verdict,
        "model_versions": run.model_versions,
        "report_url": f"/reports/{run.id}",
    }


@router.get("/reports", response_model=RunsPublic)
def read_reports(_: ManagerDep, session: SessionDep) -> RunsPublic:
    """Registered training runs, newest first."""
    runs = list_runs(session)
    data = [RunSummary(**_summary(r)) for r in runs]
    return RunsPublic(data=data, count=len(data))


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
    return RunPublic(**_summary(run), report=run.report)
