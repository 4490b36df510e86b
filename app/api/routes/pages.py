"""Server-rendered pages: the inspector's upload-and-label page and the manager's dashboard."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app.api.deps import SessionDep
from app.api.routes.predictions import to_public
from app.api.routes.runs import comparison, history
from app.core.security import (
    RANK,
    Principal,
    authenticate,
    check_csrf,
    csrf_token,
    end_session,
    find_key,
    start_session,
)
from app.core.training_jobs import list_datasets
from app.crud.exports import labelled_images
from app.crud.live_ab import compute_stats, decision_stats, served_versions
from app.crud.predictions import PredictionFilter, list_predictions
from app.crud.runs import list_runs
from app.schemas import TrainingRequest
from inspectlib.charts import accuracy_cost_chart
from models import list_models

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parents[2] / "templates")
templates.env.filters["pct"] = lambda v: "–" if v is None else f"{v * 100:.1f}%"


def _render(
    request: Request, template: str, who: Principal, context: dict, status_code: int = 200
) -> HTMLResponse:
    """A signed-in page: every one shows who is signed in and carries the form token."""
    return templates.TemplateResponse(
        request,
        template,
        {**context, "who": who, "csrf": csrf_token(request)},
        status_code=status_code,
    )


def _page_user(request: Request, role: str) -> Principal | Response:
    """The logged-in user if their role suffices; else a redirect to /login or a 403 page."""
    if not request.app.state.settings.auth_enabled:
        return Principal(0, "anonymous", "admin", "open")
    who = authenticate(request)
    if who is None:
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
    if RANK[who.role] < RANK[role]:
        return _render(request, "denied.html", who, {"needed": role}, status_code=403)
    return who


def _safe_next(target: str | None) -> str:
    """Only same-site paths: never redirect a login to another host."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> HTMLResponse:  # noqa: A002
    """The login form: paste an API key once; a signed, HTTP-only cookie keeps the session."""
    return templates.TemplateResponse(
        request,
        "login.html",
        {"csrf": csrf_token(request), "next": _safe_next(next), "error": None},
    )


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: SessionDep,
    key: str = Form(""),
    csrf: str = Form(""),
    next: str = Form("/"),  # noqa: A002
) -> Response:
    """Check the key; on success remember it in the session and go where the user was going."""
    check_csrf(request, csrf)
    row = find_key(session, key.strip())
    if row is None:
        return templates.TemplateResponse(
            request,
            "login.html",
            {
                "csrf": csrf_token(request),
                "next": _safe_next(next),
                "error": "That key is unknown or revoked.",
            },
            status_code=401,
        )
    start_session(request, session, row)
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout")
def logout(request: Request, session: SessionDep, csrf: str = Form("")) -> Response:
    """End the session: on the server, so a copy of the cookie is refused from now on."""
    check_csrf(request, csrf)
    end_session(request, session)
    return RedirectResponse("/login", status_code=303)


def _served(request: Request) -> dict:
    """What a page says of the served models: their classes and names, or why there are none."""
    served = request.app.state.models
    classifier = served.classifier
    return {
        "classes": classifier.classes if classifier else [],
        "models": list(classifier.models) if classifier else [],
        "models_error": served.models_error,
    }


@router.get("/", response_class=HTMLResponse)
def inspector_page(request: Request, session: SessionDep) -> Response:
    """Upload or photograph parts, see both models' answers, confirm or correct the label."""
    who = _page_user(request, "inspector")
    if not isinstance(who, Principal):
        return who
    recent, _ = list_predictions(session, PredictionFilter(labelled=True), 0, 10)
    waiting = PredictionFilter(decision="review", labelled=False)
    queue, queue_count = list_predictions(session, waiting, 0, 20, oldest_first=True)
    return _render(
        request,
        "inspector.html",
        who,
        {
            **_served(request),
            "recent": [to_public(p) for p in recent],
            "queue": [to_public(p).model_dump(mode="json") for p in queue],
            "queue_count": queue_count,
        },
    )


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard_page(request: Request, session: SessionDep) -> Response:
    """Accuracy versus cost from the latest report, and the live A/B from inspectors' labels."""
    who = _page_user(request, "manager")
    if not isinstance(who, Principal):
        return who
    classifier = request.app.state.models.classifier
    runs = list_runs(session)
    latest = runs[0] if runs else None
    stats = None
    if classifier is not None:
        stats = compute_stats(
            session,
            None,
            None,
            list(classifier.models),
            classifier.classes,
            served_versions(classifier),
        )
        stats["decisions"] = decision_stats(
            session, None, None, served_versions(classifier), classifier.good_class
        )
    disagreements, _ = list_predictions(session, PredictionFilter(disagree=True), 0, 12)
    return _render(
        request,
        "dashboard.html",
        who,
        {
            "latest": latest,
            "cost_chart": accuracy_cost_chart(latest.report) if latest else None,
            "runs": runs,
            "serving_dir": str(classifier.run_dir.resolve()) if classifier else None,
            "served_form": f"{classifier.runtime} {classifier.form}" if classifier else None,
            "form_study": classifier.form_study if classifier else None,
            "pinned": request.app.state.settings.run_dir is not None,
            "stats": stats,
            "disagreements": [to_public(p) for p in disagreements],
            "runs_cc": comparison(request, session, request.app.state.settings),
            "models_error": request.app.state.models.models_error,
        },
    )


@router.get("/history", response_class=HTMLResponse)
def history_page(request: Request, session: SessionDep) -> Response:
    """Every run that served, with its dates, who chose it, and its live figures."""
    who = _page_user(request, "manager")
    if not isinstance(who, Principal):
        return who
    served, events = history(session)
    return _render(request, "history.html", who, {"served": served, "events": events})


@router.get("/training", response_class=HTMLResponse)
def training_page(request: Request, session: SessionDep) -> Response:
    """The engineer's page: start a PoC run on a dataset folder, follow it, open its report."""
    who = _page_user(request, "admin")
    if not isinstance(who, Principal):
        return who
    settings = request.app.state.settings
    root = settings.training_datasets_dir
    return _render(
        request,
        "training.html",
        who,
        {
            "root": root.resolve(),
            "datasets": list_datasets(root),
            "labelled": len(labelled_images(session)),
            "models": list_models(),
            "defaults": TrainingRequest.model_fields,
        },
    )
