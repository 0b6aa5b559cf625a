"""The worker registry and long-running jobs.

``{prefix}workers`` holds one row per live worker (renewed every few seconds); a row
that stops renewing marks its worker dead, and what it held returns to pending. The
commands table gains ``kind`` (NULL for a command, ``'job'`` for a job); the relay's
due index leaves jobs out (their workers claim them) and a jobs index serves those claims.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from orch_outbox.schema import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

DUE = sa.text("status = 'pending' AND kind IS NULL")
JOBS = sa.text("status = 'pending' AND kind = 'job'")
PENDING = sa.text("status = 'pending'")


def upgrade(prefix: str = "orch_") -> None:
    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    table = f"{prefix}commands"
    with op.batch_alter_table(table) as batch:
        batch.add_column(sa.Column("kind", sa.String(8), nullable=True))
    op.drop_index(f"{table}_due_idx", table_name=table)
    op.create_index(
        f"{table}_due_idx", table, [sa.text("priority DESC"), "scheduled_at"], postgresql_where=DUE, sqlite_where=DUE
    )
    op.create_index(
        f"{table}_jobs_idx",
        table,
        ["target", sa.text("priority DESC"), "scheduled_at"],
        postgresql_where=JOBS,
        sqlite_where=JOBS,
    )
    op.create_table(
        f"{prefix}workers",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("pool", sa.String(32), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("queues", json, nullable=False),
        sa.Column("max_jobs", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
    )


def downgrade(prefix: str = "orch_") -> None:
    table = f"{prefix}commands"
    op.drop_table(f"{prefix}workers")
    op.drop_index(f"{table}_jobs_idx", table_name=table)
    op.drop_index(f"{table}_due_idx", table_name=table)
    op.create_index(
        f"{table}_due_idx",
        table,
        [sa.text("priority DESC"), "scheduled_at"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    with op.batch_alter_table(table) as batch:
        batch.drop_column("kind")
