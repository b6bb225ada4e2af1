"""Uploaded files. Deleting one only marks it: jobs keep naming their files, and ids must never be reused."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, exists, select, update

from tunelab.job_service.db import FileRow, JobRow
from tunelab.job_service.store.database import Database, Page, page
from tunelab.job_service.store.jobs import ACTIVE


class FileRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, row: FileRow) -> FileRow:
        with self.db.write() as s:
            s.add(row)
        return row

    def get(self, project_id: str, file_id: str) -> FileRow | None:
        with self.db.read() as s:
            return s.scalar(_live(project_id, file_id))

    def page(
        self, project_id: str, purpose: str | None, ascending: bool, after: str | None, limit: int
    ) -> Page[FileRow]:
        stmt = select(FileRow).where(FileRow.project_id == project_id, FileRow.deleted.is_(False))
        if purpose:
            stmt = stmt.where(FileRow.purpose == purpose)
        with self.db.read() as s:
            return page(s, stmt, FileRow, after, limit, ascending)

    def to_validate(self) -> list[FileRow]:
        with self.db.read() as s:
            stmt = select(FileRow).where(FileRow.status == "uploaded", FileRow.deleted.is_(False))
            return list(s.scalars(stmt))

    def finish_validation(
        self, file_id: str, status: str, details: str | None, problems: list[dict[str, Any]], n_examples: int
    ) -> None:
        with self.db.write() as s:
            s.execute(
                update(FileRow)
                .where(FileRow.id == file_id)
                .values(status=status, status_details=details, problems=problems, n_examples=n_examples)
            )

    def in_use(self, file_id: str) -> bool:
        """Whether a job that has not ended trains or validates on the file."""
        with self.db.read() as s:
            uses = (JobRow.training_file == file_id) | (JobRow.validation_file == file_id)
            return bool(s.scalar(select(exists().where(uses, JobRow.status.in_(ACTIVE)))))

    def delete(self, project_id: str, file_id: str) -> FileRow | None:
        with self.db.write() as s:
            row = s.scalar(_live(project_id, file_id))
            if row is not None:
                row.deleted = True
            return row


def _live(project_id: str, file_id: str) -> Select[FileRow]:
    return select(FileRow).where(FileRow.id == file_id, FileRow.project_id == project_id, FileRow.deleted.is_(False))
