"""Server-rendered pages: the inspector's upload-and-label page and the manager's dashboard."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from app.api.deps import SessionDep
from app.api.routes.predictions import to_public
from app.crud import PredictionFilter, compute_stats, list_predictions
from app.tables import Run
from training.report import accuracy_cost_chart

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parents[2] / "templates")
templates.env.filters["pct"] = lambda v: "–" if v is None else f"{v * 100:.1f}%"


@router.get("/", response_class=HTMLResponse)
def inspector_page(request: Request, session: SessionDep) -> HTMLResponse:
    """Upload or photograph parts, see both models' answers, confirm or correct the label."""
    classifier = request.app.state.classifier
    recent, _ = list_predictions(session, PredictionFilter(labelled=True), 0, 10)
    return templates.TemplateResponse(
        request,
        "inspector.html",
        {
            "classes": classifier.classes if classifier else [],
            "models": list(classifier.models) if classifier else [],
            "models_error": request.app.state.models_error,
            "recent": [to_public(p) for p in recent],
        },
    )


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard_page(request: Request, session: SessionDep) -> HTMLResponse:
    """Accuracy versus cost from the latest report, and the live A/B from inspectors' labels."""
    classifier = request.app.state.classifier
    runs = list(
        session.execute(select(Run).order_by(Run.created_at.desc(), Run.id.desc())).scalars()
    )
    latest = runs[0] if runs else None
    stats = None
    if classifier is not None:
        stats = compute_stats(session, None, None, list(classifier.models), classifier.classes)
    disagreements, _ = list_predictions(session, PredictionFilter(disagree=True), 0, 12)
    return templates.TemplateResponse(
        request,
        "dashboard.html",
        {
            "latest": latest,
            "cost_chart": accuracy_cost_chart(latest.report) if latest else None,
            "runs": runs,
            "stats": stats,
            "disagreements": [to_public(p) for p in disagreements],
            "models_error": request.app.state.models_error,
        },
    )
