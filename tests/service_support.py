"""Helpers for the service tests: stores on SQLite (always) and PostgreSQL (when TUNELAB_TEST_POSTGRES_URL is set),
chat data files, and a live `tunelab service` on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, create_engine

from tunelab.job_service.db import Base, normalise_url
from tunelab.job_service.store import Store

ROOT = Path(__file__).parents[1]
CHAT = ROOT / "data" / "chat" / "train.jsonl"
POSTGRES_URL = os.environ.get("TUNELAB_TEST_POSTGRES_URL")
DATABASES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgresql",
        id="postgresql",
        marks=pytest.mark.skipif(not POSTGRES_URL, reason="set TUNELAB_TEST_POSTGRES_URL to test on PostgreSQL"),
    ),
]
# Jobs small enough for seconds on the tiny model; no evaluation unless a test wants it.
FAST = {"train": {"max_steps": 6, "max_seq_len": 64, "batch_size": 2}, "checkpoints": {"every_steps": 2}}
NO_EVAL = {"eval": {"enabled": False}}


def database_url(kind: str, tmp: Path) -> str:
    return f"sqlite:///{tmp / 'service.db'}" if kind == "sqlite" else str(POSTGRES_URL)


def postgres_schema_url(schema: str) -> str:
    """The test server's URL, with its own empty schema: a live service and the other tests never share tables."""
    engine = create_engine(normalise_url(str(POSTGRES_URL)))
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    engine.dispose()
    joiner = "&" if "?" in str(POSTGRES_URL) else "?"
    return f"{POSTGRES_URL}{joiner}options=-csearch_path%3D{schema}"


def fresh_store(kind: str, tmp: Path) -> Store:
    """An empty store at the newest revision: PostgreSQL tables are dropped first, as each test starts from
    nothing."""
    store = Store(database_url(kind, tmp), pool_size=4)
    if kind != "sqlite":
        drop_tables(store.db.engine)
    store.upgrade()
    return store


def drop_tables(engine: Engine) -> None:
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")


def chat_file(path: Path, n: int = 40) -> Path:
    lines = CHAT.read_text(encoding="utf-8").splitlines()[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveService:
    url: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def output(self) -> str:
        logs = [self.log, *sorted((self.data_dir / "logs").glob("*.log"))]
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in logs if p.exists())


@contextmanager
def live_service(
    data_dir: Path,
    models: dict[str, Path],
    database: str | None = None,
    workers: int = 2,
    extra: Sequence[str] = (),
) -> Iterator[LiveService]:
    """`tunelab service` in a subprocess on a free loopback port, stopped (SIGTERM) at the end. Two workers: when
    a test kills one, the other takes the job over at once. `extra`: more options (e.g. `--executor ray`)."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "tunelab.job_service.cli", "--data-dir", str(data_dir), "--port", str(port)]
    command += ["--workers", str(workers), "--lease-s", "5", "--heartbeat-s", "0.2", "--stop-timeout", "60"]
    command += ["--worker-nice", "0", "--poll-s", "0.2"]
    for name, path in models.items():
        command += ["--model", f"{name}={path}"]
    if database:
        command += ["--database", database]
    command += extra
    log = data_dir / f"service-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    service = LiveService(f"http://127.0.0.1:{port}/v1", process, data_dir, log)
    try:
        _wait_healthy(service)
        yield service
    finally:
        service.stop()


def _wait_healthy(service: LiveService, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"service exited early:\n{service.output()}")
        try:
            if httpx.get(service.url.removesuffix("/v1") + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"service not healthy after {timeout}s:\n{service.output()}")


def api_key(data_dir: Path, project: str, database: str | None = None) -> str:
    """A new API key for `project`, made as a user makes one: `tunelab service keys create`."""
    from typer.testing import CliRunner

    from tunelab.job_service.cli import app as service_cli

    args = ["keys", "create", "--project", project, "--data-dir", str(data_dir)]
    result = CliRunner().invoke(service_cli, args + (["--database", database] if database else []))
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


def wait_for(predicate: Callable[[], bool], timeout: float = 90, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
