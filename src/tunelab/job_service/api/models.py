"""/v1/models: the base models jobs may use, and the project's fine-tuned models (list, retrieve, delete)."""

from __future__ import annotations

from fastapi import APIRouter

from tunelab.job_service import models as service
from tunelab.job_service.api.deps import ContextDep, ProjectDep
from tunelab.job_service.api.views import model_view
from tunelab.job_service.schemas import ListPage, ModelDeleted, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(ctx: ContextDep, project: ProjectDep) -> ListPage[ModelObject]:
    found = service.list_models(ctx.settings, ctx.store, project.id, ctx.started_at)
    return ListPage.of([model_view(m) for m in found])


@router.get("/{model_id}")
def retrieve_model(ctx: ContextDep, project: ProjectDep, model_id: str) -> ModelObject:
    return model_view(service.get_model(ctx.settings, ctx.store, project.id, model_id, ctx.started_at))


@router.delete("/{model_id}")
def delete_model(ctx: ContextDep, project: ProjectDep, model_id: str) -> ModelDeleted:
    service.delete_model(ctx.settings, ctx.store, ctx.chat, project.id, model_id)
    return ModelDeleted(id=model_id, deleted=True)
