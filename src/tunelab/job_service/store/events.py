"""Job events: what every repository that moves a job writes, in the same transaction as the move."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from tunelab.job_service.db import EventRow
from tunelab.job_service.ids import new_id, now


@dataclass(frozen=True)
class Event:
    message: str
    level: str = "info"
    type: str = "message"
    data: dict[str, Any] | None = None


def add_events(session: Session, job_id: str, events: Sequence[Event]) -> None:
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
