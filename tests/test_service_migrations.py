"""The service database's migrations, on SQLite and (with TUNELAB_TEST_POSTGRES_URL) PostgreSQL: a database made by
tunelab 0.1.0 (its DDL kept verbatim in tests/fixtures) is stamped and upgraded with its jobs and files intact; the
initial revision is exactly that schema; the newest revision is exactly the models (so neither can drift); starts
that race upgrade once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import Engine, MetaData, create_engine, insert, inspect, text

from service_support import DATABASES, postgres_schema_url
from tunelab.errors import TunelabError
from tunelab.job_service.api import create_app
from tunelab.job_service.db import Base, FileRow, normalise_url
from tunelab.job_service.ids import hash_key, now
from tunelab.job_service.migrations import INITIAL, alembic_config
from tunelab.job_service.settings import ServiceSettings
from tunelab.job_service.store import Store

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "sk-tl-test-old-release-key"
SPEC = {  # what 0.1.0 stored for a job: the validated JobSpec, abridged to what the job's view reads
    "method": {"name": "lora"},
    "task": {"scenario": "chat"},
    "train": {"epochs": 1, "batch_size": 8},
    "checkpoints": {"every_steps": 10},
}


@pytest.fixture(params=DATABASES)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of its own: a file, or a fresh PostgreSQL schema named after the test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'service.db'}"
    return postgres_schema_url(f"mig_{request.node.originalname.removeprefix('test_')[:40]}")


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    plain = create_engine(normalise_url(url))
    yield plain
    plain.dispose()


def _create_as_0_1_0(engine: Engine) -> None:
    ddl = (FIXTURES / f"service_db_0.1.0.{engine.dialect.name}.sql").read_text(encoding="utf-8")
    code = "\n".join(line for line in ddl.splitlines() if not line.startswith("--"))
    with engine.begin() as conn:
        for statement in filter(str.strip, code.split(";")):
            conn.exec_driver_sql(statement)


def _rows_of_0_1_0(engine: Engine, tmp: Path) -> dict[str, Any]:
    """A project with a key, a processed file and a succeeded job, written into the tables 0.1.0 made."""
    old = MetaData()
    old.reflect(engine)
    tables = old.tables
    content = tmp / "file-old.jsonl"
    content.write_text('{"messages": []}\n', encoding="utf-8")
    stamp = now()
    file = {"id": "file-old", "project_id": "proj-old", "filename": "train.jsonl", "purpose": "fine-tune", "bytes": 17}
    file |= {"created_at": stamp, "status": "processed", "n_examples": 1, "path": str(content), "deleted": False}
    job = {"id": "ftjob-old", "project_id": "proj-old", "model": "embedded", "training_file": "file-old", "seed": 3}
    job |= {"hyperparameters": {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0}, "spec": SPEC}
    job |= {"status": "succeeded", "created_at": stamp, "result_files": [], "attempts": 1, "last_step": 22}
    job |= {"keep_checkpoints": 3, "fine_tuned_model": "ft:embedded::old", "meta": {"team": "x"}}
    with engine.begin() as conn:
        conn.execute(insert(tables["projects"]).values(id="proj-old", name="old", created_at=stamp))
        key = {"id": "key-old", "project_id": "proj-old", "key_hash": hash_key(KEY), "hint": KEY[:10], "name": ""}
        conn.execute(insert(tables["api_keys"]).values(**key, created_at=stamp))
        conn.execute(insert(tables["files"]).values(**file))
        conn.execute(insert(tables["jobs"]).values(**job))
        conn.execute(insert(tables["job_metadata"]).values(job_id="ftjob-old", key="team", value="x"))
    return {"file": file, "job": job}


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_the_new_release_finds_the_jobs_and_files_of_a_0_1_0_database(
    url: str, engine: Engine, tmp_path: Path
) -> None:
    _create_as_0_1_0(engine)
    old = _rows_of_0_1_0(engine, tmp_path)
    assert "alembic_version" not in inspect(engine).get_table_names()

    store = Store(url, pool_size=2)
    with TestClient(create_app(ServiceSettings(data_dir=tmp_path / "svc"), store)) as client:  # starts: upgrades
        headers = {"Authorization": f"Bearer {KEY}"}
        job = client.get("/v1/fine_tuning/jobs/ftjob-old", headers=headers).json()
        files = client.get("/v1/files", headers=headers).json()["data"]
        listed = client.get("/v1/fine_tuning/jobs", params={"metadata[team]": "x"}, headers=headers).json()["data"]
        content = client.get("/v1/files/file-old/content", headers=headers)
    assert _revision(engine) == _head()
    assert (job["status"], job["fine_tuned_model"], job["seed"]) == ("succeeded", "ft:embedded::old", 3)
    assert job["training_file"] == "file-old" and job["metadata"] == {"team": "x"}
    assert [(f["id"], f["bytes"], f["status"]) for f in files] == [("file-old", 17, "processed")]
    assert [j["id"] for j in listed] == ["ftjob-old"]
    assert content.content == b'{"messages": []}\n'
    # New rows go after the old ones: the sequences that order every list carry on from 0.1.0's rows.
    new = FileRow(**{**old["file"], "id": "file-new", "created_at": now()})
    store.files.add(new)
    assert [f.id for f in store.files.page("proj-old", None, True, None, 10).items] == ["file-old", "file-new"]
    store.close()


def test_the_initial_revision_is_the_0_1_0_schema(url: str, engine: Engine, tmp_path: Path) -> None:
    sqlite = engine.dialect.name == "sqlite"
    legacy_url = f"sqlite:///{tmp_path / 'legacy.db'}" if sqlite else postgres_schema_url("mig_legacy_0_1_0")
    legacy = create_engine(normalise_url(legacy_url))
    _create_as_0_1_0(legacy)
    old = MetaData()
    old.reflect(legacy)
    legacy.dispose()
    with engine.begin() as conn:
        config = alembic_config(conn)
        command.upgrade(config, INITIAL)
        assert compare_metadata(MigrationContext.configure(conn), old) == []


def test_autogenerate_finds_no_difference_between_the_models_and_the_migrations(url: str, engine: Engine) -> None:
    store = Store(url, pool_size=1)
    store.upgrade()
    store.close()
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert differences == [], "db.py and the migrations differ: add a revision (see tunelab.job_service.migrations)"


def test_starts_that_race_upgrade_once(url: str, engine: Engine) -> None:
    stores = [Store(url, pool_size=1) for _ in range(3)]
    errors: list[BaseException] = []

    def start(store: Store) -> None:
        try:
            store.upgrade()
        except BaseException as exc:  # reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert errors == []
    assert _revision(engine) == _head()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_a_database_with_only_some_tunelab_tables_is_refused(url: str, engine: Engine) -> None:
    Base.metadata.tables["projects"].create(engine)
    store = Store(url, pool_size=1)
    with pytest.raises(TunelabError, match="not api_keys, checkpoints"):
        store.upgrade()
    store.close()
    assert set(inspect(engine).get_table_names()) == {"projects"}  # left as it was

