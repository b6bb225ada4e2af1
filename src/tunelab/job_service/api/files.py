"""/v1/files: upload (multipart, purpose=fine-tune), list, retrieve, content, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from tunelab.job_service import files as service
from tunelab.job_service.api.deps import ContextDep, ProjectDep
from tunelab.job_service.api.views import file_view
from tunelab.job_service.artefacts import Artefacts
from tunelab.job_service.schemas import FileDeleted, FileObject, ListPage

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("")
def upload_file(
    ctx: ContextDep,
    project: ProjectDep,
    background: BackgroundTasks,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> FileObject:
    row = service.save_upload(ctx.settings, ctx.store, project.id, file.file, file.filename, purpose)
    # Validated after the response: uploads return at once, as OpenAI's do.
    background.add_task(service.validate_uploaded, ctx.settings, ctx.store, [row])
    return file_view(row)


@router.get("")
def list_files(
    ctx: ContextDep,
    project: ProjectDep,
    purpose: str | None = None,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
) -> ListPage[FileObject]:
    page = service.list_files(ctx.store, project.id, purpose, order == "asc", after, limit)
    return ListPage.of([file_view(r) for r in page.items], page.has_more)


@router.get("/{file_id}")
def retrieve_file(ctx: ContextDep, project: ProjectDep, file_id: str) -> FileObject:
    return file_view(service.get_file(ctx.store, project.id, file_id), detail=True)


@router.get("/{file_id}/content")
def file_content(ctx: ContextDep, project: ProjectDep, file_id: str) -> FileResponse:
    row = service.get_file(ctx.store, project.id, file_id)
    path = Artefacts.of(ctx.settings).local(Path(row.path))  # from the bucket when this node has no copy
    return FileResponse(path, filename=row.filename, media_type="application/octet-stream")


@router.delete("/{file_id}")
def delete_file(ctx: ContextDep, project: ProjectDep, file_id: str) -> FileDeleted:
    service.delete_file(ctx.settings, ctx.store, project.id, file_id)
    return FileDeleted(id=file_id, deleted=True)
