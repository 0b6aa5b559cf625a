"""Fixtures of the PostgreSQL integration tests.

``make_outbox`` builds extra outboxes (own Celery app on the in-memory broker, own table
prefix) when a test needs settings or an injected clock that ``pg_outbox`` does not
have; every table it creates is dropped afterwards. ``FakeClock`` is a mutable clock:
with ``Outbox(clock=...)`` the store computes due times and leases from it instead of
the database's ``now()``, so a test moves time instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox

from .support import FakeClock, integration_prefix, new_app


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_outbox(pg_engine: sa.Engine) -> Iterator[Callable[..., Outbox]]:
    """``make_outbox(clock=None, engine=None, app=None, **settings)``: a fresh outbox on PostgreSQL, dropped after."""
    made: list[Outbox] = []

    def factory(clock: Any = None, engine: sa.Engine | None = None, app: Any = None, **settings: Any) -> Outbox:
        options: dict[str, Any] = {"lock_buffer": 2.0, "retry_backoff": "fixed", "retry_backoff_base": 0.0}
        options.update(settings)
        options.setdefault("table_prefix", integration_prefix())
        outbox = Outbox(app or new_app(), engine or pg_engine, clock=clock, **options)
        outbox.create_tables()
        made.append(outbox)
        return outbox

    yield factory
    for outbox in made:
        outbox.store.drop_all()
        outbox.close()


@pytest.fixture
def clocked_outbox(make_outbox: Callable[..., Outbox], fake_clock: FakeClock) -> Outbox:
    """An outbox on PostgreSQL whose store reads ``fake_clock`` instead of the database clock."""
    return make_outbox(clock=fake_clock)


@pytest.fixture
def orders(pg_outbox: Outbox, pg_engine: sa.Engine) -> Iterator[sa.Table]:
    """An application table living next to the outbox, written in the same transactions."""
    metadata = sa.MetaData()
    table = sa.Table(
        f"{pg_outbox.settings.table_prefix}orders",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(100), nullable=False),
    )
    metadata.create_all(pg_engine)
    yield table
    metadata.drop_all(pg_engine)
