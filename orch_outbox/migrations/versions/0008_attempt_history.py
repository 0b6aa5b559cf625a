"""The attempt history: ``{prefix}attempts`` and the trigger that keeps every attempt that ended without a success.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orch_outbox.schema import UTCDateTime, history_ddl

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade(prefix: str = "orch_") -> None:
    op.create_table(
        f"{prefix}attempts",
        sa.Column(
            "command_id",
            sa.Uuid(),
            sa.ForeignKey(f"{prefix}commands.id", ondelete="CASCADE", name=f"{prefix}attempts_command_fkey"),
            primary_key=True,
        ),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("error_type", sa.String(200), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_traceback", sa.Text(), nullable=True),
    )
    for statement in history_ddl(prefix).get(op.get_bind().dialect.name, []):
        op.execute(statement)


def downgrade(prefix: str = "orch_") -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    on_table = f" ON {prefix}commands" if postgresql else ""
    op.execute(f"DROP TRIGGER IF EXISTS {prefix}commands_history{on_table}")
    if postgresql:
        op.execute(f"DROP FUNCTION IF EXISTS {prefix}commands_history()")
    op.drop_table(f"{prefix}attempts")
