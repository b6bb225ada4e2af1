"""The service database's migrations (Alembic, shipped in the package) and `upgrade`, which the API and
`tunelab service keys` run before they use the database; workers start after the API and find it upgraded.

tunelab 0.1.0 created its tables with `create_all` and kept no revision. Such a database is recognised by its
tables and stamped as the initial revision (which is exactly that schema), then upgraded like any other.

A change to `db.py` needs a revision here; from the repository root (its alembic.ini points here):

    alembic -x url=sqlite:////tmp/dev.db upgrade head
    alembic -x url=sqlite:////tmp/dev.db revision --autogenerate --rev-id 0002 -m "what changed"

`tests/test_service_migrations.py` fails while the models and the revisions differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

from tunelab.errors import TunelabError
from tunelab.job_service.db import WRITE_OPTION

if TYPE_CHECKING:
    from alembic.config import Config

HERE = Path(__file__).parent
INITIAL = "0001"
INITIAL_TABLES = frozenset({"projects", "api_keys", "files", "jobs", "job_metadata", "events", "checkpoints", "models"})
# PostgreSQL serialises concurrent upgrades with this advisory lock ("tunelab" in ASCII); SQLite with its write lock.
PG_LOCK = 0x74756E656C6162


def upgrade(engine: Engine) -> None:
    """Upgrade the database to the newest revision, creating the tables in an empty one. The API and `keys create`
    may start at the same moment: each upgrades in one transaction under a lock, so the second waits, then finds
    nothing left to do (SQLite and PostgreSQL both roll DDL back with the transaction, so no half-made schema)."""
    from alembic import command  # here: workers use the store too, and never upgrade

    with engine.execution_options(**{WRITE_OPTION: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK})
        config = alembic_config(conn)
        if _made_before_migrations(conn):
            command.stamp(config, INITIAL)
        command.upgrade(config, "head")


def alembic_config(conn: Connection | None = None) -> Config:
    """Alembic's settings without an ini file; `env.py` runs the migrations on `conn` when given."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = conn
    return config


def _made_before_migrations(conn: Connection) -> bool:
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables or not tables & INITIAL_TABLES:
        return False  # migrated already, or empty (tables of other applications are left alone)
    missing = INITIAL_TABLES - tables
    if missing:
        # Not a schema any tunelab release made: upgrading it would fail half-way, or worse, succeed.
        raise TunelabError(
            f"The service database has some of tunelab's tables but not {', '.join(sorted(missing))}: "
            "it was not made by tunelab service; use an empty database or a tunelab one."
        )
    return True
