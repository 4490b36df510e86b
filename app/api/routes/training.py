"""Training from the service: the engineer starts a PoC run on a dataset folder and follows it."""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException, Request
from sqlalchemy import select

from app.api.deps import AdminDep, RowId, SessionDep, SettingsDep
from app.core import training_jobs as jobs
from app.core.inference import ServedRun
from app.crud.errors import as_utc
from app.schemas import (
    DatasetsPublic,
    TrainingJobPublic,
    TrainingJobsPublic,
    TrainingRequest,
)
from app.tables import TrainingJob
from models import list_models

router = APIRouter(prefix="/training", tags=["training"])


def to_public(job: TrainingJob) -> TrainingJobPublic:
    return TrainingJobPublic(
        id=job.id,
        state=job.state,
        dataset=job.dataset,
        options=job.options,
        requested_by=job.requested_by,
        created_at=as_utc(job.created_at),
        finished_at=as_utc(job.finished_at),
        message=job.message,
        run_dir=job.run_dir,
        report_url=f"/reports/{job.run_id}" if job.run_id else None,
        progress=jobs.progress(job),
    )


@router.get("/datasets", response_model=DatasetsPublic)
def read_datasets(_: AdminDep, settings: SettingsDep) -> DatasetsPublic:
    """The dataset folders the training page can train on: class folders of images, directly
    under the datasets directory (`MAXMIN_DATASETS_DIR`)."""
    root = settings.training_datasets_dir
    return DatasetsPublic(root=str(root.resolve()), data=jobs.list_datasets(root))


@router.post(
    "/jobs",
    response_model=TrainingJobPublic,
    status_code=202,
    responses={409: {"description": "a training job is running"}, 422: {"description": "bad"}},
)
def start_job(
    who: AdminDep,
    body: TrainingRequest,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
) -> TrainingJobPublic:
    """Start `maxmin-inspect train` on the dataset, at low CPU priority beside serving; one job at a
    time. The finished run is registered as a report; the service serves it after a restart."""
    unknown = sorted(set(body.models) - set(list_models()))
    if unknown:
        raise HTTPException(
            422, detail=f"unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}"
        )
    models = list(dict.fromkeys(body.models))
    # A service that runs the ONNX forms can serve only runs that have them; one that runs the
    # pruned forms, only runs pruned as its own run was.
    prune = None
    if settings.model_form.startswith("pruned"):
        prune = _served_keep(request.app.state.models.classifier)
    options = jobs.TrainingOptions(
        models,
        body.epochs,
        body.seeds,
        body.size,
        compress=settings.runtime == "onnxruntime",
        prune=prune,
    )
    try:
        job = jobs.start(
            session,
            request.app.state.sessions,
            settings.training_datasets_dir,
            settings.runs_dir,
            settings.device,
            body.dataset,
            options,
            who.name,
            body.inspected,
            request.app.state.store,
        )
    except jobs.TrainingRefused as exc:
        raise HTTPException(exc.status, detail=str(exc)) from None
    return to_public(job)


DEFAULT_KEEP = 0.5  # the documented example, when the served run says nothing


def _served_keep(served: ServedRun | None) -> float:
    """The fraction of filters the served run's pruned forms keep, read from its report."""
    if served is None:
        return DEFAULT_KEEP
    try:
        report = json.loads((served.run_dir / "report.json").read_text())
        return float(report["compression"]["pruning"]["keep"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_KEEP


@router.get("/jobs", response_model=TrainingJobsPublic)
def read_jobs(_: AdminDep, session: SessionDep) -> TrainingJobsPublic:
    """The latest 50 training jobs, newest first, with the running one's progress."""
    rows = session.execute(select(TrainingJob).order_by(TrainingJob.id.desc()).limit(50)).scalars()
    data = [to_public(jobs.refresh(session, job)) for job in list(rows)]
    return TrainingJobsPublic(data=data, count=len(data))


@router.get("/jobs/{job_id}", response_model=TrainingJobPublic)
def read_job(_: AdminDep, job_id: RowId, session: SessionDep) -> TrainingJobPublic:
    job = session.get(TrainingJob, job_id)
    if job is None:
        raise HTTPException(404, detail=f"training job {job_id} not found")
    return to_public(jobs.refresh(session, job))


@router.post("/jobs/{job_id}/cancel", response_model=TrainingJobPublic)
def cancel_job(who: AdminDep, job_id: RowId, session: SessionDep) -> TrainingJobPublic:
    """Stop a running job; its partial run directory is kept with its log, unregistered."""
    job = session.get(TrainingJob, job_id)
    if job is None:
        raise HTTPException(404, detail=f"training job {job_id} not found")
    try:
        return to_public(jobs.cancel(session, job, who.name))
    except jobs.TrainingRefused as exc:
        raise HTTPException(exc.status, detail=str(exc)) from None
