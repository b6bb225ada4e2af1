"""The models a project sees: the shared base models, its fine-tuned models and their checkpoints (each one usable
by name in a chat). Base models cannot be deleted; deleting a fine-tuned model removes its folders, while its
checkpoints stay: they are models of their own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.job_service.artefacts import Artefacts
from tunelab.job_service.chat import ChatModels
from tunelab.job_service.errors import ApiError, not_found
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Store
from tunelab.layout import RunLayout

BASE_OWNER = "tunelab"
_RUN = RunLayout(Path())
MODEL_FOLDERS = (_RUN.merged.name, _RUN.adapter.name, _RUN.pissa_init.name)  # what run_job writes (tunelab.recipe)


@dataclass(frozen=True)
class ModelInfo:
    id: str
    created_at: float
    owned_by: str  # BASE_OWNER, or the project that trained it


def list_models(settings: ServiceSettings, store: Store, project_id: str, started_at: float) -> list[ModelInfo]:
    """Base models first (dated from the service's start: they have no other date), then the project's own."""
    own = [ModelInfo(r.id, r.created_at, r.project_id) for r in store.models.all(project_id)]
    return _base_models(settings, started_at) + own


def get_model(settings: ServiceSettings, store: Store, project_id: str, name: str, started_at: float) -> ModelInfo:
    """A base model, one of the project's fine-tuned models, or one of its checkpoints; others' are a 404."""
    for base in _base_models(settings, started_at):
        if base.id == name:
            return base
    row = store.models.get(project_id, name)
    if row is not None:
        return ModelInfo(row.id, row.created_at, row.project_id)
    checkpoint = store.models.checkpoint(project_id, name)
    if checkpoint is not None:
        return ModelInfo(name, checkpoint.created_at, project_id)
    raise not_found("model", name)


def delete_model(settings: ServiceSettings, store: Store, chat: ChatModels, project_id: str, name: str) -> None:
    if name in settings.base_models():
        raise ApiError(403, "model_not_deletable", f"Base model {name} cannot be deleted.", "model")
    row = store.models.delete(project_id, name)
    if row is None:
        raise not_found("model", name)
    chat.forget(name)  # a loaded copy would otherwise keep answering under a deleted name
    artefacts = Artefacts.of(settings)
    for folder in model_folders(Path(row.path)):
        artefacts.remove(folder)


def model_folders(path: Path) -> list[Path]:
    """Every folder of the job's final model: the one it is served from (`merged` or `adapter`), the adapter a
    merged model came from, and PiSSA's initial adapter. Checkpoints are models of their own and stay."""
    job_dir = path.parent
    return [path, *(job_dir / name for name in MODEL_FOLDERS if job_dir / name != path)]


def _base_models(settings: ServiceSettings, started_at: float) -> list[ModelInfo]:
    return [ModelInfo(name, started_at, BASE_OWNER) for name in settings.base_models()]
