"""Guarantee 1 on PostgreSQL: a command exists if and only if the caller's transaction commits.

Every test pushes through the caller's own Session or Connection and then looks at the
outbox table from *another* connection (the store's), the way a relay would.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from orch_outbox import Outbox

from .support import unique_target

pytestmark = pytest.mark.pg


class Boom(Exception):
    pass


@pytest.fixture
def send_email(pg_outbox: Outbox) -> Any:
    @pg_outbox.command(target=unique_target("email"))
    def send_email(to: str, subject: str = "hi") -> None:
        raise AssertionError("never executed in these tests")

    return send_email


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


def count_rows(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_push_in_session_that_rolls_back_leaves_no_row(pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any,
                                                        orders: sa.Table) -> None:
    """Guarantee 1 (no ghost command): push + business write in a Session, then rollback.

    Fails if push wrote the row on a connection of its own (or autocommitted it): the
    outbox table would hold a command whose order never existed.
    """
    with Session(pg_engine) as session:
        session.execute(sa.insert(orders).values(id=1, email="a@example.com"))
        command_id = send_email.push(session, "a@example.com")
        session.rollback()

    assert pg_outbox.store.get(command_id) is None
    assert count_rows(pg_engine, pg_outbox.store.table) == 0
    assert count_rows(pg_engine, orders) == 0
    assert pg_outbox.store.claim(10, 30) == []


def test_push_in_session_that_raises_inside_begin_leaves_no_row(pg_outbox: Outbox, pg_engine: sa.Engine,
                                                                 send_email: Any) -> None:
    """Guarantee 1: ``with session.begin():`` that raises rolls the command back with the rest.

    Fails if the command survived an exception in the caller's unit of work.
    """
    with Session(pg_engine) as session, pytest.raises(Boom), session.begin():
        send_email.push(session, "a@example.com")
        raise Boom

    assert count_rows(pg_engine, pg_outbox.store.table) == 0


def test_push_in_session_that_commits_leaves_exactly_one_row(pg_outbox: Outbox, pg_engine: sa.Engine,
                                                              send_email: Any, orders: sa.Table) -> None:
    """Guarantee 1 (no lost command): commit makes exactly one pending row, with the business row.

    Fails if push inserted twice, not at all, or outside the session's transaction.
    """
    with Session(pg_engine) as session, session.begin():
        session.execute(sa.insert(orders).values(id=1, email="a@example.com"))
        command_id = send_email.push(session, "a@example.com", subject="welcome")

    assert count_rows(pg_engine, pg_outbox.store.table) == 1
    assert count_rows(pg_engine, orders) == 1
    info = pg_outbox.get(command_id)
    assert info.status == "pending"
    assert info.attempt == 0
    assert info.input == {"to": "a@example.com", "subject": "welcome"}


def test_push_in_rolled_back_savepoint_is_discarded_but_outer_commit_keeps_the_rest(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any
) -> None:
    """Guarantee 1 at savepoint granularity: a command pushed inside a rolled-back SAVEPOINT is gone.

    Fails if push escaped the caller's nested transaction (the discarded command would exist).
    """
    with Session(pg_engine) as session, session.begin():
        kept = send_email.push(session, "kept@example.com")
        nested = session.begin_nested()
        dropped = send_email.push(session, "dropped@example.com")
        nested.rollback()

    assert pg_outbox.store.get(dropped) is None
    assert pg_outbox.get(kept).status == "pending"
    assert count_rows(pg_engine, pg_outbox.store.table) == 1


def test_push_on_connection_inside_engine_begin_that_raises_rolls_back(pg_outbox: Outbox, pg_engine: sa.Engine,
                                                                        send_email: Any, orders: sa.Table) -> None:
    """Guarantee 1 with Core: ``with engine.begin() as conn`` that raises leaves nothing behind.

    Fails if pushing on a Connection committed independently of the caller's block.
    """
    pushed: list[uuid.UUID] = []
    with pytest.raises(Boom), pg_engine.begin() as conn:
        conn.execute(sa.insert(orders).values(id=7, email="b@example.com"))
        pushed.append(send_email.push(conn, "b@example.com"))
        pushed.extend(pg_outbox.push_many(conn, [send_email.s(f"{i}@example.com") for i in range(5)]))
        raise Boom

    assert len(pushed) == 6
    assert all(pg_outbox.store.get(i) is None for i in pushed)
    assert count_rows(pg_engine, pg_outbox.store.table) == 0
    assert count_rows(pg_engine, orders) == 0


def test_command_in_open_transaction_is_invisible_to_relay_until_commit(pg_outbox: Outbox, pg_engine: sa.Engine,
                                                                         send_email: Any) -> None:
    """Guarantee 1 (no early dispatch): while the pushing transaction is open, a relay claims nothing.

    The claim runs on another pooled connection while the push's transaction is still
    open. Fails if the relay could see (and publish) an uncommitted command, which a
    later rollback would turn into a ghost task; or if the committed command were not
    claimable right after commit.
    """
    conn = pg_engine.connect()
    try:
        tx = conn.begin()
        command_id = send_email.push(conn, "c@example.com")
        # the caller's own connection sees its row ...
        assert conn.execute(
            sa.select(sa.func.count()).select_from(pg_outbox.store.table)
        ).scalar_one() == 1
        # ... the relay, on another connection, does not
        assert pg_outbox.store.claim(100, 30) == []
        assert pg_outbox.store.get(command_id) is None
        assert pg_outbox.relay_once() == 0
        tx.commit()
    finally:
        conn.close()

    claimed = pg_outbox.store.claim(100, 30)
    assert [(d.id, d.attempt) for d in claimed] == [(command_id, 1)]
    assert pg_outbox.get(command_id).status == "dispatched"


def test_command_pushed_then_rolled_back_while_relay_polls_is_never_claimed(pg_outbox: Outbox,
                                                                             pg_engine: sa.Engine,
                                                                             send_email: Any) -> None:
    """Guarantee 1: a relay polling during an open transaction that finally rolls back never sees the row.

    Fails if any claim between push and rollback returned the command.
    """
    with pg_engine.connect() as conn:
        tx = conn.begin()
        send_email.push(conn, "d@example.com")
        seen = [pg_outbox.store.claim(100, 30) for _ in range(3)]
        tx.rollback()
    seen.append(pg_outbox.store.claim(100, 30))
    assert seen == [[], [], [], []]
    assert count_rows(pg_engine, pg_outbox.store.table) == 0


@pytest.mark.parametrize("count", [1, 60], ids=["one-insert", "copy"])
@pytest.mark.parametrize("ending", ["commit", "rollback", "close"])
def test_push_on_a_commit_as_you_go_connection_follows_its_commit(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any, count: int, ending: str
) -> None:
    """Guarantee 1 on SQLAlchemy's "commit as you go" Connection (no explicit begin): commit keeps the pushes,
    rollback or close without commit leaves none.

    One row goes in as a prepared INSERT and 60 through COPY, both on the driver
    connection: fails if SQLAlchemy did not know its transaction had begun, so that
    ``conn.commit()`` committed nothing and the commands were lost.
    """
    with pg_engine.connect() as conn:
        if count == 1:
            send_email.push(conn, "e@example.com")
        else:
            pg_outbox.push_many(conn, [send_email.s(f"{i}@example.com") for i in range(count)])
        if ending == "commit":
            conn.commit()
        elif ending == "rollback":
            conn.rollback()
    assert count_rows(pg_engine, pg_outbox.store.table) == (count if ending == "commit" else 0)
