"""Every query the service makes. Each method is one transaction; every object lookup filters on its project.

Writers use compare-and-set updates (`UPDATE ... WHERE status = ...`) so that the API and several worker processes
can change the same job without locks held across calls; SQLite serialises writers (BEGIN IMMEDIATE), PostgreSQL
re-checks the WHERE clause after a concurrent update.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Select, delete, exists, func, select, update
from sqlalchemy.orm import Session

from tunelab.service.db import (
    WRITE_OPTION,
    ApiKey,
    Base,
    CheckpointRow,
    EventRow,
    FileRow,
    JobMetadata,
    JobRow,
    ModelRow,
    Project,
    make_engine,
)
from tunelab.service.ids import hash_key, new_api_key, new_id, now

T = TypeVar("T", FileRow, JobRow, EventRow, CheckpointRow)
ACTIVE = ("validating_files", "queued", "running", "paused")


@dataclass(frozen=True)
class Event:
    message: str
    level: str = "info"
    type: str = "message"
    data: dict[str, Any] | None = None


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    has_more: bool


@dataclass
class Progress:
    """What a worker's monitor reports each tick."""

    events: list[Event] = field(default_factory=list)
    last_step: int | None = None
    total_steps: int | None = None
    trained_tokens: int | None = None
    estimated_finish: float | None = None


class Store:
    def __init__(self, url: str, pool_size: int = 10) -> None:
        self.engine = make_engine(url, pool_size)
        self._writer = self.engine.execution_options(**{WRITE_OPTION: True})

    def create_tables(self) -> None:
        Base.metadata.create_all(self.engine)

    def drop_tables(self) -> None:
        Base.metadata.drop_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._writer, expire_on_commit=False) as session, session.begin():
            yield session

    # Projects and keys.

    def create_key(self, project_name: str, key_name: str = "") -> tuple[Project, str]:
        """A new API key for the project (created if new). The key is returned once; only its hash is stored."""
        key = new_api_key()
        with self._write() as s:
            project = s.scalar(select(Project).where(Project.name == project_name))
            if project is None:
                project = Project(id=new_id("proj"), name=project_name, created_at=now())
                s.add(project)
                s.flush()
            s.add(
                ApiKey(
                    id=new_id("key"),
                    project_id=project.id,
                    key_hash=hash_key(key),
                    hint=key[:10],
                    name=key_name,
                    created_at=now(),
                )
            )
        return project, key

    def project_for_key(self, key: str) -> Project | None:
        with self._read() as s:
            stmt = (
                select(Project)
                .join(ApiKey, ApiKey.project_id == Project.id)
                .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
            )
            return s.scalar(stmt)

    def list_keys(self) -> list[tuple[ApiKey, Project]]:
        with self._read() as s:
            rows = s.execute(select(ApiKey, Project).join(Project, ApiKey.project_id == Project.id))
            return [(k, p) for k, p in rows.tuples()]

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as s:
            done = s.execute(
                update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now())
            )
            return bool(done.rowcount)  # type: ignore[attr-defined]

    # Files.

    def add_file(self, row: FileRow) -> FileRow:
        with self._write() as s:
            s.add(row)
        return row

    def get_file(self, project_id: str, file_id: str) -> FileRow | None:
        with self._read() as s:
            return s.scalar(_live_file(project_id, file_id))

    def list_files(
        self, project_id: str, purpose: str | None, ascending: bool, after: str | None, limit: int
    ) -> Page[FileRow]:
        stmt = select(FileRow).where(FileRow.project_id == project_id, FileRow.deleted.is_(False))
        if purpose:
            stmt = stmt.where(FileRow.purpose == purpose)
        with self._read() as s:
            return _page(s, stmt, FileRow, after, limit, ascending)

    def files_to_validate(self) -> list[FileRow]:
        with self._read() as s:
            stmt = select(FileRow).where(FileRow.status == "uploaded", FileRow.deleted.is_(False))
            return list(s.scalars(stmt))

    def finish_file_validation(
        self, file_id: str, status: str, details: str | None, problems: list[dict[str, Any]], n_examples: int
    ) -> None:
        with self._write() as s:
            s.execute(
                update(FileRow)
                .where(FileRow.id == file_id)
                .values(status=status, status_details=details, problems=problems, n_examples=n_examples)
            )

    def file_in_use(self, file_id: str) -> bool:
        with self._read() as s:
            uses = (JobRow.training_file == file_id) | (JobRow.validation_file == file_id)
            return bool(s.scalar(select(exists().where(uses, JobRow.status.in_(ACTIVE)))))

    def delete_file(self, project_id: str, file_id: str) -> FileRow | None:
        with self._write() as s:
            row = s.scalar(_live_file(project_id, file_id))
            if row is not None:
                row.deleted = True
            return row

    # Jobs.

    def add_job(self, row: JobRow, events: Sequence[Event]) -> JobRow:
        with self._write() as s:
            s.add(row)
            s.flush()  # the job row first: metadata rows reference it
            s.add_all(JobMetadata(job_id=row.id, key=k, value=v) for k, v in (row.meta or {}).items())
            _add_events(s, row.id, events)
        return row

    def get_job(self, project_id: str, job_id: str) -> JobRow | None:
        # Polled by every client: read with Core (no session), about 40% cheaper than the ORM path.
        with self.engine.connect() as conn:
            stmt = select(JobRow.__table__).where(JobRow.id == job_id, JobRow.project_id == project_id)
            found = _load(conn, stmt, JobRow)
        return found[0] if found else None

    def job(self, job_id: str) -> JobRow | None:
        """A job by id alone: for workers, which act for every project."""
        with self._read() as s:
            return s.scalar(select(JobRow).where(JobRow.id == job_id))

    def list_jobs(
        self, project_id: str, after: str | None, limit: int, metadata: dict[str, str] | None, null_metadata: bool
    ) -> Page[JobRow]:
        stmt = select(JobRow).where(JobRow.project_id == project_id)
        for key, value in (metadata or {}).items():
            pair = (JobMetadata.job_id == JobRow.id) & (JobMetadata.key == key) & (JobMetadata.value == value)
            stmt = stmt.where(exists().where(pair))
        if null_metadata:
            stmt = stmt.where(~exists().where(JobMetadata.job_id == JobRow.id))
        with self._read() as s:
            return _page(s, stmt, JobRow, after, limit, ascending=False)

    def transition(
        self,
        job_id: str,
        from_: Sequence[str],
        to: str,
        events: Sequence[Event],
        **values: Any,
    ) -> bool:
        """Move a job from one of `from_` to `to` (compare-and-set); False when it was in another state."""
        with self._write() as s:
            done = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status.in_(from_)).values(status=to, **values)
            )
            if not done.rowcount:  # type: ignore[attr-defined]
                return False
            _add_events(s, job_id, events)
            return True

    def request_control(self, job_id: str, control: str, event: Event) -> bool:
        """Ask the worker running the job to pause or cancel it; it applies the request after the current step."""
        with self._write() as s:
            done = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == "running").values(control=control)
            )
            if done.rowcount:  # type: ignore[attr-defined]
                _add_events(s, job_id, [event])
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def jobs_validating(self) -> list[JobRow]:
        with self._read() as s:
            return list(s.scalars(select(JobRow).where(JobRow.status == "validating_files")))

    def claim(self, worker: str, lease_s: float) -> JobRow | None:
        """The oldest queued job, leased to `worker`; None when the queue is empty."""
        queued = select(JobRow.id).where(JobRow.status == "queued").order_by(JobRow.seq).limit(8)
        with self._read() as s:  # idle workers poll: only take the write lock when there is something to claim
            if s.scalar(queued) is None:
                return None
        with self._write() as s:
            for job_id in list(s.scalars(queued)):
                done = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.status == "queued")
                    .values(
                        status="running",
                        lease_owner=worker,
                        lease_expires_at=now() + lease_s,
                        attempts=JobRow.attempts + 1,
                        control=None,
                    )
                )
                if done.rowcount:  # type: ignore[attr-defined]
                    return s.scalar(select(JobRow).where(JobRow.id == job_id))
        return None

    def heartbeat(self, job_id: str, worker: str, lease_s: float, progress: Progress) -> tuple[bool, str | None]:
        """Renew the lease and record progress; returns (lease still held, pending control request)."""
        values: dict[str, Any] = {"lease_expires_at": now() + lease_s}
        for name in ("last_step", "total_steps", "trained_tokens", "estimated_finish"):
            if getattr(progress, name) is not None:
                values[name] = getattr(progress, name)
        with self._write() as s:
            held = _owned(job_id, worker)
            done = s.execute(update(JobRow).where(*held).values(**values))
            if not done.rowcount:  # type: ignore[attr-defined]
                return False, None
            _add_events(s, job_id, progress.events)
            return True, s.scalar(select(JobRow.control).where(JobRow.id == job_id))

    def release(
        self,
        job_id: str,
        worker: str,
        status: str,
        events: Sequence[Event],
        model: ModelRow | None = None,
        files: Sequence[FileRow] = (),
        **values: Any,
    ) -> bool:
        """End a worker's lease, moving the job to `status`, with its final events, model and result files."""
        with self._write() as s:
            done = s.execute(
                update(JobRow)
                .where(*_owned(job_id, worker))
                .values(status=status, lease_owner=None, lease_expires_at=None, control=None, **values)
            )
            if not done.rowcount:  # type: ignore[attr-defined]
                return False
            s.add_all(files)
            if model is not None:
                s.add(model)
            _add_events(s, job_id, events)
            return True

    def expire_leases(self, max_attempts: int, owner: str | None = None) -> list[str]:
        """Re-queue running jobs whose worker stopped renewing its lease (or, with `owner`, whose worker died)."""
        stmt = select(JobRow).where(JobRow.status == "running")
        stmt = stmt.where(JobRow.lease_owner == owner) if owner else stmt.where(JobRow.lease_expires_at < now())
        moved: list[str] = []
        with self._read() as s:
            if s.scalar(stmt.with_only_columns(JobRow.id).limit(1)) is None:
                return moved
        with self._write() as s:
            for job in list(s.scalars(stmt)):
                status, event = _after_lost_worker(job, max_attempts)
                done = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job.id, JobRow.status == "running", JobRow.lease_owner == job.lease_owner)
                    .values(status=status, lease_owner=None, lease_expires_at=None, control=None, **_ended(status))
                )
                if done.rowcount:  # type: ignore[attr-defined]
                    _add_events(s, job.id, [event])
                    moved.append(job.id)
        return moved

    # Events.

    def add_events(self, job_id: str, events: Sequence[Event]) -> None:
        with self._write() as s:
            _add_events(s, job_id, events)

    def list_events(self, project_id: str, job_id: str, after: str | None, limit: int) -> Page[EventRow] | None:
        """A page of the job's events, newest first; None when the project has no such job. Polled like
        `get_job`, so read with Core too."""
        events = EventRow.__table__
        owned = select(JobRow.seq).where(JobRow.id == job_id, JobRow.project_id == project_id)
        stmt = select(events).where(events.c.job_id == job_id)
        with self.engine.connect() as conn:
            if conn.execute(owned).first() is None:
                return None
            if after:
                cursor = conn.execute(select(events.c.seq).where(events.c.job_id == job_id, events.c.id == after))
                seq = cursor.scalar()
                if seq is None:
                    return Page([], False)
                stmt = stmt.where(events.c.seq < seq)
            rows = _load(conn, stmt.order_by(events.c.seq.desc()).limit(limit + 1), EventRow)
        return Page(rows[:limit], len(rows) > limit)

    # Checkpoints.

    def add_checkpoint(self, row: CheckpointRow, keep: int, event: Event) -> list[str]:
        """Record a checkpoint and forget all but the newest `keep`; returns the folders no longer kept."""
        with self._write() as s:
            s.add(row)
            _add_events(s, row.job_id, [event])
            s.flush()
            old = list(
                s.scalars(
                    select(CheckpointRow)
                    .where(CheckpointRow.job_id == row.job_id)
                    .order_by(CheckpointRow.step_number.desc())
                    .offset(keep)
                )
            )
            if old:
                s.execute(delete(CheckpointRow).where(CheckpointRow.id.in_([c.id for c in old])))
            return [c.path for c in old]

    def checkpoint_steps(self, job_id: str) -> set[int]:
        with self._read() as s:
            return set(s.scalars(select(CheckpointRow.step_number).where(CheckpointRow.job_id == job_id)))

    def list_checkpoints(
        self, project_id: str, job_id: str, after: str | None, limit: int
    ) -> Page[CheckpointRow] | None:
        stmt = select(CheckpointRow).where(CheckpointRow.job_id == job_id)
        with self._read() as s:
            if not _job_exists(s, project_id, job_id):
                return None
            return _page(s, stmt, CheckpointRow, after, limit, ascending=False)

    def checkpoint_model(self, project_id: str, name: str) -> CheckpointRow | None:
        with self._read() as s:
            stmt = select(CheckpointRow).where(CheckpointRow.model_name == name, CheckpointRow.project_id == project_id)
            return s.scalar(stmt)

    # Models.

    def list_models(self, project_id: str) -> list[ModelRow]:
        with self._read() as s:
            stmt = select(ModelRow).where(ModelRow.project_id == project_id, ModelRow.deleted.is_(False))
            return list(s.scalars(stmt.order_by(ModelRow.seq)))

    def get_model(self, project_id: str, name: str) -> ModelRow | None:
        with self._read() as s:
            return s.scalar(_live_model(project_id, name))

    def delete_model(self, project_id: str, name: str) -> ModelRow | None:
        with self._write() as s:
            row = s.scalar(_live_model(project_id, name))
            if row is not None:
                row.deleted = True
            return row

    def count(self, table: type[Base]) -> int:
        with self._read() as s:
            return int(s.scalar(select(func.count()).select_from(table)) or 0)


def _live_file(project_id: str, file_id: str) -> Select[FileRow]:
    return select(FileRow).where(FileRow.id == file_id, FileRow.project_id == project_id, FileRow.deleted.is_(False))


def _live_model(project_id: str, name: str) -> Select[ModelRow]:
    return select(ModelRow).where(ModelRow.id == name, ModelRow.project_id == project_id, ModelRow.deleted.is_(False))


def _load(conn: Connection, stmt: Select[Any], table: type[T]) -> list[T]:
    """Rows as detached instances of `table` (their attribute names are their column names)."""
    return [table(**row._mapping) for row in conn.execute(stmt)]


def _job_exists(session: Session, project_id: str, job_id: str) -> bool:
    stmt = select(JobRow.seq).where(JobRow.id == job_id, JobRow.project_id == project_id)
    return session.scalar(stmt) is not None


def _owned(job_id: str, worker: str) -> tuple[Any, ...]:
    return JobRow.id == job_id, JobRow.lease_owner == worker, JobRow.status == "running"


def _ended(status: str) -> dict[str, Any]:
    return {"finished_at": now()} if status in ("succeeded", "failed", "cancelled") else {}


def _after_lost_worker(job: JobRow, max_attempts: int) -> tuple[str, Event]:
    """Where a job goes when its worker is lost: a pending request wins; then retry, up to max_attempts."""
    if job.control == "cancel":
        return "cancelled", Event("Worker lost; the job was cancelled as requested")
    if job.control == "pause":
        return "paused", Event("Worker lost; the job is paused as requested (resume continues from the checkpoint)")
    if job.attempts >= max_attempts:
        return "failed", Event(f"Worker lost {job.attempts} time(s); the job failed", level="error")
    return "queued", Event("Worker lost; the job is queued again and resumes from its last checkpoint", level="warn")


def _add_events(session: Session, job_id: str, events: Sequence[Event]) -> None:
    stamp = now()
    session.add_all(
        EventRow(
            id=new_id("ftevent"),
            job_id=job_id,
            created_at=stamp,
            level=e.level,
            message=e.message,
            type=e.type,
            data=e.data,
        )
        for e in events
    )


def _page(session: Session, stmt: Select[T], table: type[T], after: str | None, limit: int, ascending: bool) -> Page[T]:
    """One page after the object `after` (exclusive), in `seq` order. The cursor is looked up within the same
    filtered list, so another project's id gives an empty page rather than a position."""
    seq_col = table.seq
    if after:
        cursor = session.scalar(stmt.with_only_columns(seq_col).where(table.id == after))
        if cursor is None:
            return Page([], False)
        stmt = stmt.where(seq_col > cursor if ascending else seq_col < cursor)
    stmt = stmt.order_by(seq_col.asc() if ascending else seq_col.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    return Page(rows[:limit], len(rows) > limit)
