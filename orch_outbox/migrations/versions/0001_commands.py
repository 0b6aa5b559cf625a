"""The commands table.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from orch_outbox.schema import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = "'pending', 'dispatched', 'running', 'completed', 'failed', 'canceled', 'expired'"


def upgrade(prefix: str = "orch_") -> None:
    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    table = f"{prefix}commands"
    op.create_table(
        table,
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("input", json, nullable=False),
        sa.Column("output", json, nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("retries_left", sa.Integer(), nullable=False),
        sa.Column("timeout", sa.Float(), nullable=False),
        sa.Column("scheduled_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("dispatched_at", UTCDateTime(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("error_type", sa.String(200), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_traceback", sa.Text(), nullable=True),
        sa.Column("parent_id", sa.Uuid(), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.CheckConstraint(f"status IN ({STATUSES})", name=f"{table}_status_check"),
        sa.CheckConstraint("retries_left >= 0 AND retries >= 0", name=f"{table}_retries_check"),
        sa.CheckConstraint("timeout > 0", name=f"{table}_timeout_check"),
    )
    pending = sa.text("status = 'pending'")
    leased = sa.text("status IN ('dispatched', 'running')")
    op.create_index(
        f"{table}_due_idx",
        table,
        [sa.text("priority DESC"), "scheduled_at"],
        postgresql_where=pending,
        sqlite_where=pending,
    )
    op.create_index(f"{table}_lease_idx", table, ["lease_expires_at"], postgresql_where=leased, sqlite_where=leased)
    op.create_index(f"{table}_parent_idx", table, ["parent_id"])
    op.create_index(f"{table}_status_target_idx", table, ["status", "target"])


def downgrade(prefix: str = "orch_") -> None:
    op.drop_table(f"{prefix}commands")
