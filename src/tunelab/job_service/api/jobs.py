"""/v1/fine_tuning/jobs: create, list (cursor + metadata filter), retrieve, cancel, pause, resume, events,
checkpoints."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from tunelab.job_service import jobs as service
from tunelab.job_service.api.deps import ContextDep, ProjectDep
from tunelab.job_service.api.views import checkpoint_view, event_view, fast_json, job_view
from tunelab.job_service.db import JobRow
from tunelab.job_service.schemas import FineTuningJob, JobCheckpoint, JobCreate, JobEvent, ListPage

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


@router.post("")
def create_job(ctx: ContextDep, project: ProjectDep, body: JobCreate) -> FineTuningJob:
    return job_view(service.create_job(ctx.settings, ctx.store, project.id, body))


@router.get("", response_model=ListPage[FineTuningJob])
def list_jobs(
    ctx: ContextDep,
    project: ProjectDep,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    metadata, null_metadata = _metadata_filter(request)
    page = service.list_jobs(ctx.store, project.id, after, limit, metadata, null_metadata)
    return fast_json(ListPage.of([job_view(r) for r in page.items], page.has_more))


def _metadata_filter(request: Request) -> tuple[dict[str, str], bool]:
    """`metadata[k]=v` pairs (the openai client's deep-object form), or `metadata=null` for jobs without any."""
    pairs = {
        key[len("metadata[") : -1]: value
        for key, value in request.query_params.items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    return pairs, request.query_params.get("metadata") == "null"


@router.get("/{job_id}", response_model=FineTuningJob)
def retrieve_job(ctx: ContextDep, project: ProjectDep, job_id: str) -> Response:
    return fast_json(job_view(service.get_job(ctx.store, project.id, job_id)))


@router.post("/{job_id}/cancel")
def cancel_job(ctx: ContextDep, project: ProjectDep, job_id: str) -> FineTuningJob:
    return _bound_for(service.cancel_job(ctx.store, project.id, job_id), "cancel", "cancelled")


@router.post("/{job_id}/pause")
def pause_job(ctx: ContextDep, project: ProjectDep, job_id: str) -> FineTuningJob:
    return _bound_for(service.pause_job(ctx.store, project.id, job_id), "pause", "paused")


def _bound_for(row: JobRow, control: str, status: str) -> FineTuningJob:
    """A running job stops after its current step; OpenAI's answer (and its clients' checks) already show the
    state it is bound for. Retrieving the job shows `running` until the worker has actually stopped it."""
    view = job_view(row)
    if row.status == "running" and row.control == control:
        return view.model_copy(update={"status": status, "estimated_finish": None})
    return view


@router.post("/{job_id}/resume")
def resume_job(ctx: ContextDep, project: ProjectDep, job_id: str) -> FineTuningJob:
    return job_view(service.resume_job(ctx.store, project.id, job_id))


@router.get("/{job_id}/events", response_model=ListPage[JobEvent])
def list_events(
    ctx: ContextDep,
    project: ProjectDep,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> Response:
    page = service.list_events(ctx.store, project.id, job_id, after, limit)
    return fast_json(ListPage.of([event_view(r) for r in page.items], page.has_more))


@router.get("/{job_id}/checkpoints")
def list_checkpoints(
    ctx: ContextDep,
    project: ProjectDep,
    job_id: str,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> ListPage[JobCheckpoint]:
    page = service.list_checkpoints(ctx.store, project.id, job_id, after, limit)
    return ListPage.of([checkpoint_view(r) for r in page.items], page.has_more)
