"""Jobs: the resources a job reserves on a Ray cluster (`tunelab service --executor ray`), from the request's
`tunelab.resources`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 20:35:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resources", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resources")
