"""Guarantee 1 on PostgreSQL: a command exists if and only if the caller's transaction commits.

Every test pushes through the caller's own Session or Connection and then looks at the
outbox table from *another* connection (the store's), the way a relay would.
"""

from __future__ import annotations

import uuid
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


def count_rows(engine: sa.Engine, table: sa.Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_push_in_session_that_rolls_back_leaves_no_row(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any, orders: sa.Table
) -> None:
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


def test_push_in_session_that_raises_inside_begin_leaves_no_row(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any
) -> None:
    """Guarantee 1: ``with session.begin():`` that raises rolls the command back with the rest.

    Fails if the command survived an exception in the caller's unit of work.
    """
    with Session(pg_engine) as session, pytest.raises(Boom), session.begin():
        send_email.push(session, "a@example.com")
        raise Boom

    assert count_rows(pg_engine, pg_outbox.store.table) == 0


def test_push_in_session_that_commits_leaves_exactly_one_row(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any, orders: sa.Table
) -> None:
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


def test_push_on_connection_inside_engine_begin_that_raises_rolls_back(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any, orders: sa.Table
) -> None:
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


def test_command_in_open_transaction_is_invisible_to_relay_until_commit(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any
) -> None:
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
        assert conn.execute(sa.select(sa.func.count()).select_from(pg_outbox.store.table)).scalar_one() == 1
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


def test_command_pushed_then_rolled_back_while_relay_polls_is_never_claimed(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any
) -> None:
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


def _counting_writes(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The held pushes as they reach the database: ``("write", rows)`` written before a statement (or a commit that
    cannot take them), ``("commit", rows)`` sent with the commit itself."""
    writes: list[tuple[str, int]] = []
    store = outbox.store
    real_write, real_statements = store.write_held, store.held_statements

    def counting(conn: sa.Connection, rows: Any) -> None:
        writes.append(("write", len(rows)))
        real_write(conn, rows)

    def with_commit(raw: Any, rows: Any) -> Any:
        statements = real_statements(raw, rows)
        if statements is not None:
            writes.append(("commit", len(rows)))
        return statements

    monkeypatch.setattr(store, "write_held", counting)
    monkeypatch.setattr(store, "held_statements", with_commit)
    return writes


def test_pushes_of_a_transaction_are_written_together_before_its_next_statement(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any, orders: sa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five pushes cost no round trip of their own: they reach the database in one write, right before the
    transaction's next statement (which sees them, as it would have), and the pushes after it go with the
    commit. Fails if a push wrote on its own, or if a statement could run before the pushes made ahead of it
    were written."""
    writes = _counting_writes(pg_outbox, monkeypatch)
    with Session(pg_engine) as session, session.begin():
        for i in range(5):
            send_email.push(session, f"{i}@example.com")
        assert writes == []
        seen = session.execute(sa.select(sa.func.count()).select_from(pg_outbox.store.table)).scalar_one()
        assert (seen, writes) == (5, [("write", 5)])
        session.execute(sa.insert(orders).values(id=1, email="x@example.com"))
        send_email.push(session, "5@example.com")
        send_email.options(delay=60).push(session, "6@example.com")
        assert writes == [("write", 5)]
    assert writes == [("write", 5), ("commit", 2)]
    assert count_rows(pg_engine, pg_outbox.store.table) == 7


def test_a_savepoint_writes_the_pushes_made_before_it_and_a_released_one_keeps_its_own(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any
) -> None:
    """Held pushes are written before a savepoint is set, released or rolled back to: a push made before a
    savepoint survives rolling back to it, a push inside a released savepoint is committed, a push inside a
    rolled-back one is gone."""
    with Session(pg_engine) as session, session.begin():
        before = send_email.push(session, "before@example.com")
        with session.begin_nested():
            released = send_email.push(session, "released@example.com")
        nested = session.begin_nested()
        dropped = send_email.push(session, "dropped@example.com")
        nested.rollback()
    assert pg_outbox.get(before).status == pg_outbox.get(released).status == "pending"
    assert pg_outbox.store.get(dropped) is None


def test_pushes_keep_their_order_with_bulk_and_unique_pushes(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held push is written before a later ``push_many`` (COPY, on the driver connection) and before a push
    with a unique key (which must ask the database at once): every command is there after commit, and the
    unique key resolves against rows pushed earlier in the same transaction."""
    writes = _counting_writes(pg_outbox, monkeypatch)
    with pg_engine.begin() as conn:
        first = send_email.push(conn, "first@example.com")
        bulk = pg_outbox.push_many(conn, [send_email.s(f"{i}@example.com") for i in range(60)])
        assert writes == [("write", 1)]
        keyed = send_email.options(unique_key="k1").push(conn, "keyed@example.com")
        again = send_email.options(unique_key="k1").push(conn, "keyed@example.com")
        last = send_email.push(conn, "last@example.com")
    assert again == keyed
    assert writes == [("write", 1), ("commit", 1)]
    assert {pg_outbox.get(i).status for i in [first, *bulk, keyed, last]} == {"pending"}
    assert count_rows(pg_engine, pg_outbox.store.table) == 63


@pytest.mark.parametrize("own_write", [True, False], ids=["with-the-apps-write", "push-only"])
def test_a_write_that_fails_at_commit_raises_there_and_leaves_nothing(
    pg_outbox: Outbox, pg_engine: sa.Engine, send_email: Any, orders: sa.Table, own_write: bool
) -> None:
    """Bad input is refused at push time; a database error on the held INSERT (here: the outbox table is
    gone) can only come with the write, so the commit raises it: the transaction is rolled back (the business
    row is not there either) and the session is usable again. Push-only, the transaction's BEGIN goes with the
    INSERT and the COMMIT: the same. Fails if the commit went through without the command, which would break
    guarantee 1."""
    table = pg_outbox.store.table.name
    session = Session(pg_engine)
    try:
        if own_write:
            session.execute(sa.insert(orders).values(id=3, email="c@example.com"))
        send_email.push(session, "c@example.com")
        with pg_engine.begin() as other:
            other.execute(sa.text(f"ALTER TABLE {table} RENAME TO {table}_away"))
        try:
            with pytest.raises(sa.exc.DBAPIError, match="does not exist"):
                session.commit()
            session.rollback()
            assert session.execute(sa.text("SELECT 1")).scalar_one() == 1
        finally:
            with pg_engine.begin() as other:
                other.execute(sa.text(f"ALTER TABLE {table}_away RENAME TO {table}"))
    finally:
        session.close()
    assert count_rows(pg_engine, orders) == 0
    assert count_rows(pg_engine, pg_outbox.store.table) == 0
