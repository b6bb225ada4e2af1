"""Fine-tuned models and checkpoints, both of which a project can chat with by name. A model is written with its
job's success (`leases.release`); checkpoints as the job trains, only the newest few kept."""

from __future__ import annotations

from sqlalchemy import Select, delete, select

from tunelab.job_service.db import CheckpointRow, JobRow, ModelRow
from tunelab.job_service.store.database import Database, Page, page
from tunelab.job_service.store.events import Event, add_events


class ModelRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self, project_id: str) -> list[ModelRow]:
        with self.db.read() as s:
            stmt = select(ModelRow).where(ModelRow.project_id == project_id, ModelRow.deleted.is_(False))
            return list(s.scalars(stmt.order_by(ModelRow.seq)))

    def get(self, project_id: str, name: str) -> ModelRow | None:
        with self.db.read() as s:
            return s.scalar(_live(project_id, name))

    def delete(self, project_id: str, name: str) -> ModelRow | None:
        with self.db.write() as s:
            row = s.scalar(_live(project_id, name))
            if row is not None:
                row.deleted = True
            return row

    def add_checkpoint(self, row: CheckpointRow, keep: int, event: Event) -> list[str]:
        """Record a checkpoint and forget all but the newest `keep`; returns the folders no longer kept."""
        with self.db.write() as s:
            s.add(row)
            add_events(s, row.job_id, [event])
            s.flush()
            newest_first = select(CheckpointRow).where(CheckpointRow.job_id == row.job_id)
            old = list(s.scalars(newest_first.order_by(CheckpointRow.step_number.desc()).offset(keep)))
            if old:
                s.execute(delete(CheckpointRow).where(CheckpointRow.id.in_([c.id for c in old])))
            return [c.path for c in old]

    def checkpoint_steps(self, job_id: str) -> set[int]:
        with self.db.read() as s:
            return set(s.scalars(select(CheckpointRow.step_number).where(CheckpointRow.job_id == job_id)))

    def checkpoints(self, project_id: str, job_id: str, after: str | None, limit: int) -> Page[CheckpointRow] | None:
        """A page of the job's checkpoints, newest first; None when the project has no such job."""
        stmt = select(CheckpointRow).where(CheckpointRow.job_id == job_id)
        owned = select(JobRow.seq).where(JobRow.id == job_id, JobRow.project_id == project_id)
        with self.db.read() as s:
            if s.scalar(owned) is None:
                return None
            return page(s, stmt, CheckpointRow, after, limit, ascending=False)

    def checkpoint(self, project_id: str, name: str) -> CheckpointRow | None:
        """The checkpoint a model name (`ft:...:ckpt-step-N`) stands for."""
        with self.db.read() as s:
            stmt = select(CheckpointRow).where(CheckpointRow.model_name == name, CheckpointRow.project_id == project_id)
            return s.scalar(stmt)


def _live(project_id: str, name: str) -> Select[ModelRow]:
    return select(ModelRow).where(ModelRow.id == name, ModelRow.project_id == project_id, ModelRow.deleted.is_(False))
