"""Every query the service makes, in one repository per kind of object, all sharing one engine: `keys` (projects
and API keys), `files`, `jobs` (and their events), `leases` (the jobs workers hold) and `models` (fine-tuned models
and checkpoints). Each method is one transaction, and every object lookup filters on its project."""

from __future__ import annotations

from tunelab.job_service.migrations import upgrade
from tunelab.job_service.store.database import Database, Page
from tunelab.job_service.store.events import Event
from tunelab.job_service.store.files import FileRepository
from tunelab.job_service.store.jobs import JobRepository
from tunelab.job_service.store.keys import KeyRepository
from tunelab.job_service.store.leases import LeaseRepository, Progress
from tunelab.job_service.store.models import ModelRepository

__all__ = ["Event", "Page", "Progress", "Store"]


class Store:
    def __init__(self, url: str, pool_size: int = 10) -> None:
        self.db = Database(url, pool_size)
        self.keys = KeyRepository(self.db)
        self.files = FileRepository(self.db)
        self.jobs = JobRepository(self.db)
        self.leases = LeaseRepository(self.db)
        self.models = ModelRepository(self.db)

    def upgrade(self) -> None:
        """Bring the database's tables to this release's schema (creating them in an empty database)."""
        upgrade(self.db.engine)

    def close(self) -> None:
        self.db.close()
