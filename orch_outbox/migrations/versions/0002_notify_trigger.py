"""NOTIFY the relay when a transaction that inserted commands commits (PostgreSQL only).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade(prefix: str = "orch_") -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    channel = f"{prefix}commands"
    op.execute(
        f"CREATE OR REPLACE FUNCTION {prefix}commands_notify() RETURNS trigger LANGUAGE plpgsql AS $$ "
        f"BEGIN PERFORM pg_notify('{channel}', ''); RETURN NULL; END $$"
    )
    op.execute(
        f"CREATE TRIGGER {prefix}commands_notify AFTER INSERT ON {prefix}commands "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {prefix}commands_notify()"
    )


def downgrade(prefix: str = "orch_") -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(f"DROP TRIGGER IF EXISTS {prefix}commands_notify ON {prefix}commands")
    op.execute(f"DROP FUNCTION IF EXISTS {prefix}commands_notify()")
