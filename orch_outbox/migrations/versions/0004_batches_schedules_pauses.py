"""Tenants, batches (and chords), durable chains, cron schedules and pauses.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from orch_outbox.schema import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade(prefix: str = "orch_") -> None:
    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    table = f"{prefix}commands"
    with op.batch_alter_table(table) as batch:
        batch.add_column(sa.Column("tenant", sa.String(200), nullable=True))
        batch.add_column(sa.Column("batch_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("chain", json, nullable=True))
    op.create_index(
        f"{table}_batch_idx", table, ["batch_id", "status"], postgresql_where=sa.text("batch_id IS NOT NULL")
    )
    op.create_index(f"{table}_tenant_idx", table, ["tenant", "status"])
    op.create_table(
        f"{prefix}batches",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant", sa.String(200), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False, server_default="batch"),
        sa.Column("status", sa.String(16), nullable=False, server_default="open"),
        sa.Column("continuation", json, nullable=True),
        sa.Column("continuation_id", sa.Uuid(), nullable=True),
        sa.Column("parent_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint("status IN ('open', 'finished', 'canceled')", name=f"{prefix}batches_status_check"),
    )
    is_open = sa.text("status = 'open'")
    op.create_index(
        f"{prefix}batches_open_idx",
        f"{prefix}batches",
        ["created_at"],
        postgresql_where=is_open,
        sqlite_where=is_open,
    )
    op.create_index(f"{prefix}batches_tenant_idx", f"{prefix}batches", ["tenant"])
    op.create_table(
        f"{prefix}schedules",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("command", sa.String(200), nullable=False),
        sa.Column("input", json, nullable=False),
        sa.Column("cron", sa.String(100), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False, server_default="UTC"),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=True),
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("timeout", sa.Float(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("is_unique", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("next_run_at", UTCDateTime(), nullable=False),
        sa.Column("last_run_at", UTCDateTime(), nullable=True),
        sa.Column("last_command_id", sa.Uuid(), nullable=True),
        sa.Column("skipped", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        f"{prefix}pauses",
        sa.Column("scope", sa.String(16), primary_key=True),
        sa.Column("value", sa.String(200), primary_key=True),
        sa.Column("paused_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("scope IN ('all', 'target', 'tenant')", name=f"{prefix}pauses_scope_check"),
    )


def downgrade(prefix: str = "orch_") -> None:
    table = f"{prefix}commands"
    op.drop_table(f"{prefix}pauses")
    op.drop_table(f"{prefix}schedules")
    op.drop_index(f"{prefix}batches_tenant_idx", table_name=f"{prefix}batches")
    op.drop_index(f"{prefix}batches_open_idx", table_name=f"{prefix}batches")
    op.drop_table(f"{prefix}batches")
    op.drop_index(f"{table}_tenant_idx", table_name=table)
    op.drop_index(f"{table}_batch_idx", table_name=table)
    with op.batch_alter_table(table) as batch:
        batch.drop_column("chain")
        batch.drop_column("batch_id")
        batch.drop_column("tenant")
