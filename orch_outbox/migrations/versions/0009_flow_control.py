"""Flow control: ``{prefix}limits`` (the rate limits' token buckets) and the index of due rows by tenant.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orch_outbox.schema import UTCDateTime

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade(prefix: str = "orch_") -> None:
    op.create_table(
        f"{prefix}limits",
        sa.Column("key", sa.String(220), primary_key=True),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    where = sa.text("status = 'pending' AND kind IS NULL AND tenant IS NOT NULL")
    op.create_index(
        f"{prefix}commands_due_tenant_idx",
        f"{prefix}commands",
        ["tenant", sa.text("priority DESC"), "scheduled_at"],
        postgresql_where=where,
        sqlite_where=where,
    )


def downgrade(prefix: str = "orch_") -> None:
    op.drop_index(f"{prefix}commands_due_tenant_idx", table_name=f"{prefix}commands")
    op.drop_table(f"{prefix}limits")
