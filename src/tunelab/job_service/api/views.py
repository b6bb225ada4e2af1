"""Rows as the public objects the `openai` client parses."""

from __future__ import annotations

from typing import Any

from fastapi import Response
from pydantic import BaseModel

from tunelab.job_service.db import CheckpointRow, EventRow, FileRow, JobRow
from tunelab.job_service.jobs import integrations_of
from tunelab.job_service.models import ModelInfo
from tunelab.job_service.schemas import (
    CheckpointMetrics,
    ErrorInfo,
    FileObject,
    FineTuningJob,
    JobCheckpoint,
    JobDpo,
    JobDpoHyperparameters,
    JobEvent,
    JobHyperparameters,
    JobMethod,
    JobSupervised,
    ModelObject,
)


def fast_json(model: BaseModel) -> Response:
    """The model serialised once, by pydantic. Returning the model itself makes FastAPI validate it again and go
    through a dict and `json.dumps`: on the routes clients poll, that was a large share of each request's CPU."""
    return Response(model.model_dump_json(), media_type="application/json")


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


MAX_PROBLEMS_SHOWN = 100  # a file with thousands of bad lines: the first ones tell the user what to fix


def file_view(row: FileRow, detail: bool = False) -> FileObject:
    """`detail`: with the validation's problems, one by one (line and code), as the dashboard lists them."""
    problems = (row.problems or [])[:MAX_PROBLEMS_SHOWN]
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=int(row.created_at),
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,
        status_details=row.status_details,
        tunelab={"n_examples": row.n_examples, "problems": problems} if detail else None,
    )


def job_view(row: JobRow) -> FineTuningJob:
    hyper = JobHyperparameters(**row.hyperparameters)
    spec = row.spec
    return FineTuningJob(
        id=row.id,
        created_at=int(row.created_at),
        error=ErrorInfo(**row.error) if row.error else None,
        fine_tuned_model=row.fine_tuned_model,
        finished_at=_ts(row.finished_at),
        hyperparameters=hyper,
        model=row.model,
        organization_id=row.project_id,
        result_files=list(row.result_files or []),
        seed=row.seed,
        status=row.status,
        trained_tokens=row.trained_tokens,
        training_file=row.training_file,
        validation_file=row.validation_file,
        estimated_finish=_ts(row.estimated_finish) if row.status == "running" else None,
        integrations=integrations_of(spec),
        metadata=row.meta,
        method=_method(row.hyperparameters, hyper),
        tunelab=_extension(row, spec),
    )


def _method(resolved: dict[str, Any], hyper: JobHyperparameters) -> JobMethod:
    if "beta" in resolved:  # only a preference (DPO) job has one
        return JobMethod(type="dpo", dpo=JobDpo(hyperparameters=JobDpoHyperparameters(**resolved)))
    return JobMethod(supervised=JobSupervised(hyperparameters=hyper))


def _extension(row: JobRow, spec: dict[str, Any]) -> dict[str, Any]:
    checkpoints = {**spec["checkpoints"], "keep_last": row.keep_checkpoints}
    return {
        "scenario": spec["task"]["scenario"],
        "method": spec["method"]["name"],
        "spec": {"method": spec["method"], "task": spec["task"], "train": spec["train"], "checkpoints": checkpoints},
        "step": row.last_step,
        "total_steps": row.total_steps,
        "control": row.control,
        "resources": row.resources,
    }


def event_view(row: EventRow) -> JobEvent:
    return JobEvent(
        id=row.id,
        created_at=int(row.created_at),
        level=row.level,
        message=row.message,
        data=row.data,
        type=row.type,
    )


def checkpoint_view(row: CheckpointRow) -> JobCheckpoint:
    return JobCheckpoint(
        id=row.id,
        created_at=int(row.created_at),
        fine_tuned_model_checkpoint=row.model_name,
        fine_tuning_job_id=row.job_id,
        metrics=CheckpointMetrics(**row.metrics),
        step_number=row.step_number,
    )


def model_view(model: ModelInfo) -> ModelObject:
    return ModelObject(id=model.id, created=int(model.created_at), owned_by=model.owned_by)
