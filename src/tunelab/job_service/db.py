"""The service's tables and its database connection: SQLite in WAL mode by default (nothing to install), PostgreSQL
by URL. The tables change only through migrations (`migrations/`): a change here needs a new revision there.

Every object row carries its project id, and every query in `store/` filters on it: that is the tenancy boundary.
Rows are ordered by `seq` (an increasing integer), which makes cursor pagination exact even within one second.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tunelab.extras import require

WRITE_OPTION = "tunelab_write"


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(32))  # the key's first characters, to tell keys apart in listings
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class FileRow(Base):
    __tablename__ = "files"
    __table_args__ = (Index("ix_files_project_seq", "project_id", "seq"), {"sqlite_autoincrement": True})
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))  # uploaded -> processed | error
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    problems: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    n_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_project_seq", "project_id", "seq"),
        Index("ix_jobs_status_seq", "status", "seq"),
        {"sqlite_autoincrement": True},
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the validated JobSpec the worker runs
    status: Mapped[str] = mapped_column(String(24))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimated_finish: Mapped[float | None] = mapped_column(Float, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list)
    control: Mapped[str | None] = mapped_column(String(16), nullable=True)  # a pending "pause" or "cancel"
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_step: Mapped[int] = mapped_column(Integer, default=0)  # the last step with a metrics event
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    keep_checkpoints: Mapped[int] = mapped_column(Integer, default=3)
    # What the job reserves on a Ray cluster (`tunelab.resources`); None: the service's defaults.
    resources: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class JobMetadata(Base):
    """One row per metadata pair, so the list filter `metadata[k]=v` is plain SQL on SQLite and PostgreSQL."""

    __tablename__ = "job_metadata"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(512))


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_seq", "job_id", "seq"), {"sqlite_autoincrement": True})
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_seq", "job_id", "seq"), {"sqlite_autoincrement": True})
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_name: Mapped[str] = mapped_column(String(300), unique=True)
    path: Mapped[str] = mapped_column(Text)


class ModelRow(Base):
    __tablename__ = "models"
    __table_args__ = (Index("ix_models_project_seq", "project_id", "seq"), {"sqlite_autoincrement": True})
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(300), unique=True)
    project_id: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    path: Mapped[str] = mapped_column(Text)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


def normalise_url(url: str) -> str:
    """`postgresql://...` means psycopg 3 here (SQLAlchemy's bare default is psycopg2, which is not installed)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def connect_database(url: str, pool_size: int = 10) -> Engine:
    """A connection pool to the service's database (SQLAlchemy calls it an engine; it is not a training engine)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url, pool_size)
    if url.startswith("postgresql+psycopg://"):
        require("postgres", "a PostgreSQL database")  # SQLAlchemy would raise a bare ModuleNotFoundError
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _sqlite_engine(url: str, pool_size: int) -> Engine:
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi: Any, record: Any) -> None:
        dbapi.isolation_level = None  # transactions are begun below, so writers can take the lock up front
        for pragma in ("busy_timeout=30000", "synchronous=NORMAL", "foreign_keys=ON"):
            dbapi.execute(f"PRAGMA {pragma}")
        _use_wal(dbapi)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A deferred transaction that reads and then writes can fail at once with SQLITE_BUSY when another process
        # committed in between (the busy timeout does not apply to that upgrade). Writers therefore begin
        # IMMEDIATE, taking the write lock first and waiting for it; readers stay deferred and never block in WAL.
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _use_wal(dbapi: Any, wait_s: float = 30.0) -> None:
    """Switch a new database to write-ahead logging (the mode persists in the file, so later connections find it).
    The switch needs the database to itself and SQLite reports "locked" at once, without its busy timeout, when
    several processes open a new database together: retry for up to `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if dbapi.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                dbapi.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
