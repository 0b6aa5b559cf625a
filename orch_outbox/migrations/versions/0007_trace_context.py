"""The trace context of a push, carried by its command to the relay and the worker.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade(prefix: str = "orch_") -> None:
    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    with op.batch_alter_table(f"{prefix}commands") as batch:
        batch.add_column(sa.Column("trace", json, nullable=True))


def downgrade(prefix: str = "orch_") -> None:
    with op.batch_alter_table(f"{prefix}commands") as batch:
        batch.drop_column("trace")
