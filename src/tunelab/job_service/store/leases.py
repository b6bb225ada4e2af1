"""Jobs as workers hold them: claimed under a lease, renewed by heartbeats with progress, released with the
outcome, and taken back when a worker stops renewing. Every write checks that the worker still holds the lease, so
a worker that lost its job (another one claimed it) cannot change it any more."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update

from tunelab.job_service.db import FileRow, JobRow, ModelRow
from tunelab.job_service.ids import now
from tunelab.job_service.store.database import Database
from tunelab.job_service.store.events import Event, add_events

ENDED = ("succeeded", "failed", "cancelled")


@dataclass
class Progress:
    """What a worker's monitor reports each tick."""

    events: list[Event] = field(default_factory=list)
    last_step: int | None = None
    total_steps: int | None = None
    trained_tokens: int | None = None
    estimated_finish: float | None = None


class LeaseRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self, worker: str, lease_s: float, job_id: str | None = None) -> JobRow | None:
        """The oldest queued job (or job `job_id`, if still queued), leased to `worker`; None when there is none. A
        claim is no loss: `attempts` counts lost workers only (see expire), so pause/resume and graceful restarts
        cost no crash allowance."""
        queued = select(JobRow.id).where(JobRow.status == "queued").order_by(JobRow.seq).limit(8)
        if job_id is not None:
            queued = queued.where(JobRow.id == job_id)
        with self.db.read() as s:  # idle workers poll: only take the write lock when there is something to claim
            if s.scalar(queued) is None:
                return None
        with self.db.write() as s:
            for job_id in list(s.scalars(queued)):
                done = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job_id, JobRow.status == "queued")
                    .values(
                        status="running",
                        lease_owner=worker,
                        lease_expires_at=now() + lease_s,
                        control=None,
                    )
                )
                if done.rowcount:  # type: ignore[attr-defined]
                    return s.scalar(select(JobRow).where(JobRow.id == job_id))
        return None

    def queued(self, limit: int) -> list[JobRow]:
        """The oldest queued jobs, without claiming them (the Ray executor picks each job's resources first)."""
        with self.db.read() as s:
            stmt = select(JobRow).where(JobRow.status == "queued").order_by(JobRow.seq).limit(limit)
            return list(s.scalars(stmt))

    def request_shutdown(self, worker: str) -> bool:
        """Ask `worker` to checkpoint its job and queue it again (a pending pause or cancel is kept: it also
        checkpoints). For workers the service cannot signal, such as Ray tasks; their monitor reads it."""
        with self.db.write() as s:
            done = s.execute(
                update(JobRow).where(*_held_by(worker), JobRow.control.is_(None)).values(control="shutdown")
            )
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def heartbeat(self, job_id: str, worker: str, lease_s: float, progress: Progress) -> tuple[bool, str | None]:
        """Renew the lease and record progress; returns (lease still held, pending control request)."""
        values: dict[str, Any] = {"lease_expires_at": now() + lease_s}
        for name in ("last_step", "total_steps", "trained_tokens", "estimated_finish"):
            if getattr(progress, name) is not None:
                values[name] = getattr(progress, name)
        with self.db.write() as s:
            done = s.execute(update(JobRow).where(*_held(job_id, worker)).values(**values))
            if not done.rowcount:  # type: ignore[attr-defined]
                return False, None
            add_events(s, job_id, progress.events)
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
        """End a worker's lease, moving the job to `status`, with its final events, model and result files (one
        transaction: a succeeded job always has its model)."""
        with self.db.write() as s:
            done = s.execute(
                update(JobRow)
                .where(*_held(job_id, worker))
                .values(status=status, lease_owner=None, lease_expires_at=None, control=None, **values)
            )
            if not done.rowcount:  # type: ignore[attr-defined]
                return False
            s.add_all(files)
            if model is not None:
                s.add(model)
            add_events(s, job_id, events)
            return True

    def expire(self, max_attempts: int, owner: str | None = None) -> list[str]:
        """Re-queue running jobs whose worker stopped renewing its lease (or, with `owner`, whose worker died)."""
        stmt = select(JobRow).where(JobRow.status == "running")
        stmt = stmt.where(JobRow.lease_owner == owner) if owner else stmt.where(JobRow.lease_expires_at < now())
        moved: list[str] = []
        with self.db.read() as s:  # every idle worker calls this each poll: read first, lock only when needed
            if s.scalar(stmt.with_only_columns(JobRow.id).limit(1)) is None:
                return moved
        with self.db.write() as s:
            for job in list(s.scalars(stmt)):
                status, event = _after_lost_worker(job, max_attempts)
                values = _ended(status) | ({"error": _lost_error(job.attempts + 1)} if status == "failed" else {})
                done = s.execute(
                    update(JobRow)
                    .where(JobRow.id == job.id, JobRow.status == "running", JobRow.lease_owner == job.lease_owner)
                    .values(status=status, lease_owner=None, lease_expires_at=None, control=None,
                            attempts=JobRow.attempts + 1, **values)
                )  # fmt: skip
                if done.rowcount:  # type: ignore[attr-defined]
                    add_events(s, job.id, [event])
                    moved.append(job.id)
        return moved


def _lost_error(lost: int) -> dict[str, Any]:
    # A failed job always says why: clients read `error`, not the events.
    message = f"The worker running this job was lost {lost} time(s) (killed, or out of memory); the job failed."
    return {"code": "worker_lost", "message": message, "param": None}


def _held_by(worker: str) -> tuple[Any, ...]:
    return JobRow.lease_owner == worker, JobRow.status == "running"


def _held(job_id: str, worker: str) -> tuple[Any, ...]:
    return JobRow.id == job_id, JobRow.lease_owner == worker, JobRow.status == "running"


def _ended(status: str) -> dict[str, Any]:
    return {"finished_at": now()} if status in ENDED else {}


def _after_lost_worker(job: JobRow, max_attempts: int) -> tuple[str, Event]:
    """Where a job goes when its worker is lost: a pending request wins; then retry, up to max_attempts."""
    if job.control == "cancel":
        return "cancelled", Event("Worker lost; the job was cancelled as requested")
    if job.control == "pause":
        return "paused", Event("Worker lost; the job is paused as requested (resume continues from the checkpoint)")
    lost = job.attempts + 1
    if lost >= max_attempts:
        return "failed", Event(f"Worker lost {lost} time(s); the job failed", level="error")
    return "queued", Event("Worker lost; the job is queued again and resumes from its last checkpoint", level="warn")
