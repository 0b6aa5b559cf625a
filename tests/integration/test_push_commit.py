"""The commit takes the pushes it holds along: one round trip for the rows, the COMMIT and (if needed) the BEGIN.

Round trips are counted by a proxy between the caller's engine and PostgreSQL
(``tests/support/pgwire.py``): each ``Sync`` or simple ``Query`` the client sends is one
wait for the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from orch_outbox import Outbox

from .support import unique_target
from support.pgwire import RoundTrips

pytestmark = pytest.mark.pg


@pytest.fixture
def send_email(pg_outbox: Outbox) -> Any:
    @pg_outbox.command(target=unique_target("email"))
    def send_email(to: str) -> None:
        raise AssertionError("never executed in these tests")

    return send_email


@pytest.fixture
def counted() -> Iterator[tuple[RoundTrips, sa.Engine]]:
    """An application engine whose one connection goes through a round-trip counter, already connected."""
    with RoundTrips() as proxy:
        engine = sa.create_engine(proxy.url(), pool_size=1, max_overflow=0)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        yield proxy, engine
        engine.dispose()


def warm(engine: sa.Engine, send_email: Any) -> None:
    """A first push on the engine: the outbox checks its tables there once, and starts listening to the engine."""
    with Session(engine) as session, session.begin():
        send_email.push(session, "warm@example.com")


def rows_of(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_a_push_in_its_own_transaction_takes_one_round_trip(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any, orders: sa.Table, counted: tuple[RoundTrips, sa.Engine]
) -> None:
    """A Session that only pushes waits for the database once (its BEGIN, the INSERT and the COMMIT in one
    pipeline), where the application's own INSERT of a row waits three times (BEGIN, INSERT, COMMIT). The
    command is there, pending, after the commit. Fails if the held INSERT or the COMMIT went on their own."""
    proxy, engine = counted
    warm(engine, send_email)
    proxy.reset()
    with Session(engine) as session, session.begin():
        command_id = send_email.push(session, "a@example.com")
    pushed = proxy.count
    proxy.reset()
    with Session(engine) as session, session.begin():
        session.execute(sa.insert(orders).values(id=1, email="a@example.com"))
    assert (pushed, proxy.count) == (1, 3)
    assert pg_outbox.get(command_id).status == "pending"


def test_a_push_adds_no_round_trip_to_a_transaction_that_writes(
    pg_outbox: Outbox, send_email: Any, orders: sa.Table, counted: tuple[RoundTrips, sa.Engine]
) -> None:
    """The application's transaction (its own INSERT, then a push, then commit) waits as often as the same
    transaction without the push: the push's rows go with the COMMIT. Fails if the push cost a round trip."""
    proxy, engine = counted
    warm(engine, send_email)
    waits = []
    for i, push in enumerate((False, True)):
        proxy.reset()
        with Session(engine) as session, session.begin():
            session.execute(sa.insert(orders).values(id=i, email="b@example.com"))
            if push:
                send_email.push(session, "b@example.com")
        waits.append(proxy.count)
    assert waits[0] == waits[1] == 3
    assert rows_of(engine, pg_outbox.store.table) == 2


def test_a_commit_listener_after_the_outbox_still_sees_the_pushes_in_the_open_transaction(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any, counted: tuple[RoundTrips, sa.Engine]
) -> None:
    """Another listener of the commit, registered after the outbox's, runs inside the transaction: then the
    held rows are written before it runs, and it sees them in its transaction while another connection does
    not yet. Fails if the outbox committed before a later listener ran."""
    _, engine = counted
    table = pg_outbox.store.table
    warm(engine, send_email)
    seen: list[tuple[int, int]] = []

    def later(conn: sa.Connection) -> None:
        seen.append(
            (int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()), rows_of(pg_engine, table))
        )

    event.listen(engine, "commit", later)
    try:
        with Session(engine) as session, session.begin():
            send_email.push(session, "c@example.com")
    finally:
        event.remove(engine, "commit", later)
    assert seen == [(2, 1)]
    assert rows_of(pg_engine, table) == 2


def test_a_push_in_a_read_only_transaction_fails_at_commit_and_leaves_nothing(
    pg_outbox: Outbox, send_email: Any, counted: tuple[RoundTrips, sa.Engine]
) -> None:
    """The BEGIN sent with the rows is the one the connection would send: a read-only transaction refuses the
    INSERT (as it would have refused it on its own), the commit raises, nothing is written, and the connection
    serves the next transaction. Fails if the pipelined BEGIN dropped the transaction's settings."""
    _, engine = counted
    warm(engine, send_email)
    read_only = engine.execution_options(postgresql_readonly=True)
    with Session(read_only) as session:
        send_email.push(session, "d@example.com")
        with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
            session.commit()
        session.rollback()
    assert rows_of(engine, pg_outbox.store.table) == 1  # the warm-up's
    with Session(engine) as session, session.begin():
        send_email.push(session, "e@example.com")
    assert rows_of(engine, pg_outbox.store.table) == 2


def test_large_pushes_go_with_the_commit_whole(
    pg_outbox: Outbox, send_email: Any, counted: tuple[RoundTrips, sa.Engine]
) -> None:
    """Rows larger than a socket's buffer (ten inputs of 0.9 MB, with characters JSON escapes) still go with the
    commit in one round trip, each input stored exactly as pushed. Fails if the pipeline was read before all of
    it was sent (a stalled commit), or if a value lost characters on the way."""
    proxy, engine = counted
    warm(engine, send_email)
    bodies = [f"{i}:" + ('é\t"\\\n' * 10) + "x" * 900_000 for i in range(10)]
    proxy.reset()
    with Session(engine) as session, session.begin():
        ids = [send_email.push(session, body) for body in bodies]
    assert proxy.count == 1
    assert [pg_outbox.get(i).input for i in ids] == [{"to": body} for body in bodies]
