"""Alembic environment of the outbox tables.

Run through ``orch-outbox migrate`` (or :func:`orch_outbox.migrate.upgrade`), which passes
the URL (or an open connection) and the table prefix in ``config.attributes``. The
version table is ``{prefix}alembic_version``, so it never collides with an application's
own Alembic history in the same database.
"""

from __future__ import annotations

import os
from typing import Any

from alembic import context

from orch_outbox.schema import metadata_for
from orch_outbox.store import make_engine

config = context.config
x_args = context.get_x_argument(as_dictionary=True)
prefix: str = (
    config.attributes.get("prefix") or x_args.get("prefix") or os.environ.get("ORCH_OUTBOX_TABLE_PREFIX", "orch_")
)
url: str | None = (
    config.attributes.get("url")
    or x_args.get("url")
    or os.environ.get("ORCH_OUTBOX_DATABASE_URL")
    or config.get_main_option("sqlalchemy.url")
)
target_metadata = metadata_for(prefix)
version_table = f"{prefix}alembic_version"


def run_offline() -> None:
    context.configure(
        url=url,
        target_metadata=target_metadata,
        version_table=version_table,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations(prefix=prefix)


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    if not url:
        raise SystemExit("no database: pass -x url=... or set ORCH_OUTBOX_DATABASE_URL")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection: Any) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, version_table=version_table)
    with context.begin_transaction():
        context.run_migrations(prefix=prefix)


if context.is_offline_mode():
    run_offline()
else:
    run_online()
