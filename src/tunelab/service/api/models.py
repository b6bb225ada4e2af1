"""/v1/models: the base models jobs may use, and the project's fine-tuned models (list, retrieve, delete)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from tunelab.service.api.deps import ContextDep, ProjectDep, ServiceContext
from tunelab.service.api.views import model_view
from tunelab.service.errors import ApiError, not_found
from tunelab.service.files import remove_tree
from tunelab.service.schemas import ListPage, ModelDeleted, ModelObject

router = APIRouter(prefix="/v1/models", tags=["models"])
BASE_OWNER = "tunelab"
MODEL_FOLDERS = ("merged", "adapter", "pissa_init")  # what run_job writes for the final model (tunelab.recipe)


def _base_views(ctx: ServiceContext) -> list[ModelObject]:
    created = int(ctx.started_at)
    return [ModelObject(id=name, created=created, owned_by=BASE_OWNER) for name in ctx.settings.base_models()]


@router.get("")
def list_models(ctx: ContextDep, project: ProjectDep) -> ListPage[ModelObject]:
    return ListPage.of(_base_views(ctx) + [model_view(r) for r in ctx.store.list_models(project.id)])


@router.get("/{model_id}")
def retrieve_model(ctx: ContextDep, project: ProjectDep, model_id: str) -> ModelObject:
    for view in _base_views(ctx):
        if view.id == model_id:
            return view
    row = ctx.store.get_model(project.id, model_id)
    if row is not None:
        return model_view(row)
    checkpoint = ctx.store.checkpoint_model(project.id, model_id)
    if checkpoint is not None:
        return ModelObject(id=model_id, created=int(checkpoint.created_at), owned_by=project.id)
    raise not_found("model", model_id)


@router.delete("/{model_id}")
def delete_model(ctx: ContextDep, project: ProjectDep, model_id: str) -> ModelDeleted:
    if model_id in ctx.settings.base_models():
        raise ApiError(403, "model_not_deletable", f"Base model {model_id} cannot be deleted.", "model")
    row = ctx.store.delete_model(project.id, model_id)
    if row is None:
        raise not_found("model", model_id)
    ctx.chat.forget(model_id)
    for folder in model_folders(Path(row.path)):
        remove_tree(folder)
    return ModelDeleted(id=model_id, deleted=True)


def model_folders(path: Path) -> list[Path]:
    """Every folder of the job's final model: the one it is served from (`merged` or `adapter`), the adapter a
    merged model came from, and PiSSA's initial adapter. Checkpoints are models of their own and stay."""
    job_dir = path.parent
    return [path, *(job_dir / name for name in MODEL_FOLDERS if job_dir / name != path)]
