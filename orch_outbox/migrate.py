"""Apply the outbox's Alembic migrations, from a source tree or an installed wheel."""

from __future__ import annotations

import io
from importlib import resources
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from .schema import metadata_for


def alembic_config(
    url: str | None = None,
    prefix: str = "orch_",
    connection: sa.Connection | None = None,
    output: io.StringIO | None = None,
) -> Config:
    """An Alembic config pointing at the migrations shipped inside the package."""
    config = Config(output_buffer=output) if output is not None else Config()
    config.set_main_option("script_location", str(resources.files("orch_outbox") / "migrations"))
    config.attributes.update({"url": url, "prefix": prefix, "connection": connection})
    return config


def upgrade(
    url: str | None = None, prefix: str = "orch_", revision: str = "head", connection: sa.Connection | None = None
) -> None:
    """Bring the outbox tables with this prefix up to ``revision``."""
    command.upgrade(alembic_config(url, prefix, connection), revision)


def upgrade_sql(url: str, prefix: str = "orch_", revision: str = "head") -> str:
    """The SQL an upgrade would run, for review or for a DBA (offline mode)."""
    out = io.StringIO()
    command.upgrade(alembic_config(url, prefix, output=out), revision, sql=True)
    return out.getvalue()


def downgrade(
    url: str | None = None, prefix: str = "orch_", revision: str = "base", connection: sa.Connection | None = None
) -> None:
    """Take the outbox tables with this prefix down to ``revision`` (``base`` drops them)."""
    command.downgrade(alembic_config(url, prefix, connection), revision)


def current_revision(connection: sa.Connection, prefix: str = "orch_") -> str | None:
    """The revision the database is at, or None before the first migration."""
    context = MigrationContext.configure(connection, opts={"version_table": f"{prefix}alembic_version"})
    return context.get_current_revision()


def schema_diff(connection: sa.Connection, prefix: str = "orch_") -> list[Any]:
    """Differences between the database and the declared metadata (empty when they match)."""
    from alembic.autogenerate import compare_metadata

    context = MigrationContext.configure(
        connection,
        opts={"version_table": f"{prefix}alembic_version", "compare_type": True, "compare_server_default": True},
    )
    diff = compare_metadata(context, metadata_for(prefix))
    ours = f"{prefix}"
    return [d for d in diff if ours in repr(d)]
