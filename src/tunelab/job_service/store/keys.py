"""Projects and their API keys. A key is returned once, when created; only its hash is stored."""

from __future__ import annotations

from sqlalchemy import select, update

from tunelab.job_service.db import ApiKey, Project
from tunelab.job_service.ids import hash_key, new_api_key, new_id, now
from tunelab.job_service.store.database import Database


class KeyRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, project_name: str, key_name: str = "") -> tuple[Project, str]:
        """A new API key for the project (created if new), and the key itself."""
        key = new_api_key()
        with self.db.write() as s:
            project = s.scalar(select(Project).where(Project.name == project_name))
            if project is None:
                project = Project(id=new_id("proj"), name=project_name, created_at=now())
                s.add(project)
                s.flush()  # the project row first: the key references it
            hashed = ApiKey(
                id=new_id("key"),
                project_id=project.id,
                key_hash=hash_key(key),
                hint=key[:10],
                name=key_name,
                created_at=now(),
            )
            s.add(hashed)
        return project, key

    def project_for(self, key: str) -> Project | None:
        with self.db.read() as s:
            stmt = (
                select(Project)
                .join(ApiKey, ApiKey.project_id == Project.id)
                .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
            )
            return s.scalar(stmt)

    def all(self) -> list[tuple[ApiKey, Project]]:
        with self.db.read() as s:
            rows = s.execute(select(ApiKey, Project).join(Project, ApiKey.project_id == Project.id))
            return [(k, p) for k, p in rows.tuples()]

    def revoke(self, key_id: str) -> bool:
        with self.db.write() as s:
            done = s.execute(
                update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now())
            )
            return bool(done.rowcount)  # type: ignore[attr-defined]
