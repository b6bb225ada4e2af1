"""Jobs and their events, as the API sees them: create, read, list, and the state moves users ask for. The moves
workers make under a lease are in `leases.py`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import exists, select, update

from tunelab.job_service.db import EventRow, JobMetadata, JobRow
from tunelab.job_service.store.database import Database, Page, load, page
from tunelab.job_service.store.events import Event, add_events

ACTIVE = ("validating_files", "queued", "running", "paused")  # the states a job has not ended in


class JobRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, row: JobRow, events: Sequence[Event]) -> JobRow:
        with self.db.write() as s:
            s.add(row)
            s.flush()  # the job row first: metadata rows reference it
            s.add_all(JobMetadata(job_id=row.id, key=k, value=v) for k, v in (row.meta or {}).items())
            add_events(s, row.id, events)
        return row

    def get(self, project_id: str, job_id: str) -> JobRow | None:
        # Polled by every client: read with Core.
        with self.db.core() as conn:
            stmt = select(JobRow.__table__).where(JobRow.id == job_id, JobRow.project_id == project_id)
            found = load(conn, stmt, JobRow)
        return found[0] if found else None

    def by_id(self, job_id: str) -> JobRow | None:
        """A job by id alone: for workers and the chat route's model lookup, which act for every project."""
        with self.db.read() as s:
            return s.scalar(select(JobRow).where(JobRow.id == job_id))

    def page(
        self, project_id: str, after: str | None, limit: int, metadata: dict[str, str] | None, null_metadata: bool
    ) -> Page[JobRow]:
        """Newest first; `metadata` keeps jobs with every pair, `null_metadata` jobs without any."""
        stmt = select(JobRow).where(JobRow.project_id == project_id)
        for key, value in (metadata or {}).items():
            pair = (JobMetadata.job_id == JobRow.id) & (JobMetadata.key == key) & (JobMetadata.value == value)
            stmt = stmt.where(exists().where(pair))
        if null_metadata:
            stmt = stmt.where(~exists().where(JobMetadata.job_id == JobRow.id))
        with self.db.read() as s:
            return page(s, stmt, JobRow, after, limit, ascending=False)

    def validating(self) -> list[JobRow]:
        with self.db.read() as s:
            return list(s.scalars(select(JobRow).where(JobRow.status == "validating_files")))

    def transition(self, job_id: str, from_: Sequence[str], to: str, events: Sequence[Event], **values: Any) -> bool:
        """Move a job from one of `from_` to `to` (compare-and-set); False when it was in another state."""
        with self.db.write() as s:
            done = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(from_)).values(status=to, **values)
            )
            if not done.rowcount:  # type: ignore[attr-defined]
                return False
            add_events(s, job_id, events)
            return True

    def request_control(self, job_id: str, control: str, event: Event) -> bool:
        """Ask the worker running the job to pause or cancel it; it applies the request after the current step."""
        with self.db.write() as s:
            done = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == "running").values(control=control)
            )
            if done.rowcount:  # type: ignore[attr-defined]
                add_events(s, job_id, [event])
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def add_events(self, job_id: str, events: Sequence[Event]) -> None:
        with self.db.write() as s:
            add_events(s, job_id, events)

    def events(self, project_id: str, job_id: str, after: str | None, limit: int) -> Page[EventRow] | None:
        """A page of the job's events, newest first; None when the project has no such job. Polled like `get`, so
        read with Core too."""
        events = EventRow.__table__
        owned = select(JobRow.seq).where(JobRow.id == job_id, JobRow.project_id == project_id)
        stmt = select(events).where(events.c.job_id == job_id)
        with self.db.core() as conn:
            if conn.execute(owned).first() is None:
                return None
            if after:
                cursor = conn.execute(select(events.c.seq).where(events.c.job_id == job_id, events.c.id == after))
                seq = cursor.scalar()
                if seq is None:
                    return Page([], False)
                stmt = stmt.where(events.c.seq < seq)
            rows = load(conn, stmt.order_by(events.c.seq.desc()).limit(limit + 1), EventRow)
        return Page(rows[:limit], len(rows) > limit)
