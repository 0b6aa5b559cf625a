"""NOTIFY only while a relay waits for it: ``{prefix}listeners`` and the trigger's new function.

A transaction that notified takes a cluster-wide lock at commit: with every push
notifying, many pushing transactions commit one at a time (measured: 32 concurrent
committers lost a third of their commits per second). Now a push notifies only while a
relay has marked itself idle.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from orch_outbox.schema import UTCDateTime, notify_channel, notify_function

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade(prefix: str = "orch_") -> None:
    op.create_table(
        f"{prefix}listeners",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("idle_until", UTCDateTime(), nullable=True),
    )
    if op.get_context().dialect.name == "postgresql":
        op.execute(notify_function(prefix))


def downgrade(prefix: str = "orch_") -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            f"CREATE OR REPLACE FUNCTION {prefix}commands_notify() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN PERFORM pg_notify('{notify_channel(prefix)}', ''); RETURN NULL; END $$"
        )
    op.drop_table(f"{prefix}listeners")
