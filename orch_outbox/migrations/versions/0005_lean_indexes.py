"""Leaner indexes on the commands table: no status-led index over all rows.

The ``(status, target)`` index over every row is replaced by ``(target, status)`` over
unfinished rows; the parent and tenant indexes keep only rows that have one; final rows
get a ``finished_at`` index (retention) and failed rows a ``created_at`` one (dead
letter). A completed row now sits in the primary key and the ``finished_at`` index only,
and the fenced per-command statements can only be served by the primary key.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UNFINISHED = sa.text("status IN ('pending', 'dispatched', 'running')")
FINAL = sa.text("status IN ('completed', 'failed', 'canceled', 'expired')")
FAILED = sa.text("status = 'failed'")
HAS_PARENT = sa.text("parent_id IS NOT NULL")
HAS_TENANT = sa.text("tenant IS NOT NULL")


def upgrade(prefix: str = "orch_") -> None:
    table = f"{prefix}commands"
    op.drop_index(f"{table}_status_target_idx", table_name=table)
    op.drop_index(f"{table}_parent_idx", table_name=table)
    op.drop_index(f"{table}_tenant_idx", table_name=table)
    op.create_index(
        f"{table}_unfinished_idx", table, ["target", "status"], postgresql_where=UNFINISHED, sqlite_where=UNFINISHED
    )
    op.create_index(f"{table}_finished_idx", table, ["finished_at"], postgresql_where=FINAL, sqlite_where=FINAL)
    op.create_index(f"{table}_failed_idx", table, ["created_at"], postgresql_where=FAILED, sqlite_where=FAILED)
    op.create_index(f"{table}_parent_idx", table, ["parent_id"], postgresql_where=HAS_PARENT, sqlite_where=HAS_PARENT)
    op.create_index(
        f"{table}_tenant_idx", table, ["tenant", "status"], postgresql_where=HAS_TENANT, sqlite_where=HAS_TENANT
    )


def downgrade(prefix: str = "orch_") -> None:
    table = f"{prefix}commands"
    for name in ("tenant", "parent", "failed", "finished", "unfinished"):
        op.drop_index(f"{table}_{name}_idx", table_name=table)
    op.create_index(f"{table}_tenant_idx", table, ["tenant", "status"])
    op.create_index(f"{table}_parent_idx", table, ["parent_id"])
    op.create_index(f"{table}_status_target_idx", table, ["status", "target"])
