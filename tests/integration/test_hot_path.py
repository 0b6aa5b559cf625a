"""The worker's per-command statements run on connections the user's engine made.

A worker starts and completes each command on psycopg connections its thread keeps
outside SQLAlchemy's execution layer. They must still be the engine's connections: its
URL, its ``connect_args`` and its ``connect`` events (here a ``search_path`` that puts the
outbox in a schema of its own).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from orch_outbox import Outbox
from orch_outbox.store import make_engine

from conftest import PG_URL

pytestmark = pytest.mark.pg


@pytest.fixture
def schema_engine(pg_engine: sa.Engine) -> Iterator[sa.Engine]:
    """An engine whose connections get ``search_path`` = a fresh schema from a ``connect`` event."""
    schema = f"hp_{secrets.token_hex(4)}"
    with pg_engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    engine = make_engine(PG_URL)

    @event.listens_for(engine, "connect")
    def _search_path(dbapi_conn: Any, _record: Any) -> None:
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        dbapi_conn.execute(f"SET search_path TO {schema}")
        dbapi_conn.autocommit = autocommit

    yield engine
    engine.dispose()
    with pg_engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))


def test_start_and_complete_use_the_engines_connect_events(
    make_outbox: Callable[..., Outbox], schema_engine: sa.Engine
) -> None:
    """Proves the hot path's connections come from the user's engine: with the outbox in a schema reached only
    through the engine's ``search_path`` event, a command is claimed, started and completed (a connection
    made from the URL alone would not find the table)."""
    outbox = make_outbox(engine=schema_engine)

    @outbox.command(target="hp")
    def add(a: int, b: int) -> int:
        return a + b

    command_id = add.push(schema_engine, 2, 3)
    [claimed] = outbox.store.claim(10, 60)
    started = outbox.store.start(command_id, claimed.attempt, "add", "w", 60)
    assert started is not None and started.input == {"a": 2, "b": 3}
    assert outbox.store.complete(command_id, claimed.attempt, 5, [])
    done = outbox.get(command_id)
    assert (done.status, done.output) == ("completed", 5)
    with schema_engine.connect() as conn:
        where = "SELECT schemaname FROM pg_catalog.pg_tables WHERE tablename = :t"
        assert conn.execute(sa.text(where), {"t": outbox.store.table.name}).scalar_one() != "public"
