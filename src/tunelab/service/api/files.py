"""/v1/files: upload (multipart, purpose=fine-tune), list, retrieve, content, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, File, Form, Query, UploadFile
from fastapi.responses import FileResponse

from tunelab.service.api.deps import ContextDep, ProjectDep, ServiceContext
from tunelab.service.api.views import file_view
from tunelab.service.db import FileRow
from tunelab.service.errors import bad_request, not_found
from tunelab.service.files import delete_file_content, save_upload, validate_stored_file
from tunelab.service.jobs import advance_validating
from tunelab.service.schemas import FileDeleted, FileObject, ListPage

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("")
def upload_file(
    ctx: ContextDep,
    project: ProjectDep,
    background: BackgroundTasks,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> FileObject:
    if purpose != "fine-tune":
        raise bad_request("invalid_purpose", f"purpose {purpose!r} is not supported here: use 'fine-tune'.", "purpose")
    row = save_upload(ctx.settings, ctx.store, project.id, file.file, file.filename, purpose)
    background.add_task(_validate, ctx, row)  # after the response: uploads return at once, as OpenAI's do
    return file_view(row)


def _validate(ctx: ServiceContext, row: FileRow) -> None:
    validate_stored_file(ctx.store, row, ctx.settings.max_line_bytes)
    advance_validating(ctx.settings, ctx.store)


@router.get("")
def list_files(
    ctx: ContextDep,
    project: ProjectDep,
    purpose: str | None = None,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
) -> ListPage[FileObject]:
    page = ctx.store.list_files(project.id, purpose, order == "asc", after, limit)
    return ListPage.of([file_view(r) for r in page.items], page.has_more)


@router.get("/{file_id}")
def retrieve_file(ctx: ContextDep, project: ProjectDep, file_id: str) -> FileObject:
    return file_view(_file(ctx, project.id, file_id))


@router.get("/{file_id}/content")
def file_content(ctx: ContextDep, project: ProjectDep, file_id: str) -> FileResponse:
    row = _file(ctx, project.id, file_id)
    return FileResponse(row.path, filename=row.filename, media_type="application/octet-stream")


@router.delete("/{file_id}")
def delete_file(ctx: ContextDep, project: ProjectDep, file_id: str) -> FileDeleted:
    _file(ctx, project.id, file_id)
    if ctx.store.file_in_use(file_id):
        raise bad_request("file_in_use", f"File {file_id} is used by an active fine-tuning job.", "file_id")
    row = ctx.store.delete_file(project.id, file_id)
    if row is None:
        raise not_found("file", file_id)
    delete_file_content(row)
    return FileDeleted(id=file_id, deleted=True)


def _file(ctx: ServiceContext, project_id: str, file_id: str) -> FileRow:
    row = ctx.store.get_file(project_id, file_id)
    if row is None:
        raise not_found("file", file_id)
    return row
