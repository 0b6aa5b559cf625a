"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade(prefix: str = "orch_") -> None:
    ${upgrades if upgrades else "pass"}


def downgrade(prefix: str = "orch_") -> None:
    ${downgrades if downgrades else "pass"}
