"""Unique keys (one unfinished command per key) and cancellation requests of running commands.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orch_outbox.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade(prefix: str = "orch_") -> None:
    table = f"{prefix}commands"
    with op.batch_alter_table(table) as batch:
        batch.add_column(sa.Column("unique_key", sa.String(200), nullable=True))
        batch.add_column(sa.Column("cancel_requested_at", UTCDateTime(), nullable=True))
    where = sa.text("unique_key IS NOT NULL AND status IN ('pending', 'dispatched', 'running')")
    op.create_index(
        f"{prefix}commands_unique_idx",
        table,
        ["unique_key"],
        unique=True,
        postgresql_where=where,
        sqlite_where=where,
    )


def downgrade(prefix: str = "orch_") -> None:
    table = f"{prefix}commands"
    op.drop_index(f"{prefix}commands_unique_idx", table_name=table)
    with op.batch_alter_table(table) as batch:
        batch.drop_column("cancel_requested_at")
        batch.drop_column("unique_key")
