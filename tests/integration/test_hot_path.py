"""The worker's per-command statements run on connections the user's engine made.

A worker starts and completes each command on psycopg connections its thread keeps
outside SQLAlchemy's execution layer. They must still be the engine's connections: its
URL, its ``connect_args`` and its ``connect`` events (here a ``search_path`` that puts the
outbox in a schema of its own).
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from orch_outbox import Outbox
from orch_outbox.store import hotpath, make_engine
from orch_outbox.store import starts as starts_mod
from orch_outbox.store.starts import START_LANE
from orch_outbox.testing import wait_until

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


def _claimed(
    make_outbox: Callable[..., Outbox], target: str
) -> tuple[Outbox, tuple[uuid.UUID, uuid.UUID], dict[uuid.UUID, int]]:
    """An outbox on the hot path with two commands ``job(1)``, ``job(2)`` on ``target``, claimed: (outbox, their
    ids, each one's attempt)."""
    outbox = make_outbox()
    assert outbox.store._hot is not None, "this outbox must use the hot path"

    @outbox.command(target=target)
    def job(n: int) -> int:
        return n

    ids = (job.push(outbox.engine, 1), job.push(outbox.engine, 2))
    return outbox, ids, {d.id: d.attempt for d in outbox.store.claim(10, 60)}


def test_hot_start_and_complete_are_fenced(make_outbox: Callable[..., Outbox]) -> None:
    """Guarantee 3 on the worker's hot path (database clock, psycopg): a duplicate start of the same attempt,
    a start of a canceled command, a completion by an attempt that never held the row and a second completion
    each change nothing; the one holding attempt records its output once."""
    outbox, (held, canceled), claimed = _claimed(make_outbox, "hp-fence")
    store = outbox.store
    assert outbox.cancel(canceled)
    assert store.start(canceled, claimed[canceled], "job", "w", 60) is None
    assert store.start(held, claimed[held], "job", "w1", 60) is not None
    assert store.start(held, claimed[held], "job", "w2", 60) is None  # the same message delivered twice
    assert not store.complete(held, claimed[held] + 1, 99, [])
    assert store.complete(held, claimed[held], 1, [])
    assert not store.complete(held, claimed[held], 2, [])
    done = outbox.get(held)
    assert (done.status, done.output, done.worker) == ("completed", 1, "w1")
    assert outbox.get(canceled).status == "canceled"


def test_a_statement_gone_from_the_session_is_prepared_again(make_outbox: Callable[..., Outbox]) -> None:
    """Proves the worker's libpq path survives a reset of its session (a pooler's ``DISCARD ALL``, a
    ``DEALLOCATE``): the start whose prepared statement vanished prepares it again and claims its attempt, and
    the write-back after it records both outcomes."""
    outbox, (first, second), claimed = _claimed(make_outbox, "hp-reset")
    store = outbox.store
    assert store.start(first, claimed[first], "job", "w", 60) is not None  # prepared on the starts' connection
    relaxed = store._relaxed is not None
    for held in (store._hot._held(False), store._hot._held(relaxed, START_LANE)):
        held.cursor.connection.pgconn.exec_(b"DEALLOCATE ALL")
    assert store.start(second, claimed[second], "job", "w", 60) is not None
    assert store.complete_many([(first, claimed[first], 1), (second, claimed[second], 2)]) == {first, second}
    assert [outbox.get(i).output for i in (first, second)] == [1, 2]


def _end_backend(engine: sa.Engine, pid: int) -> None:
    """End a PostgreSQL backend and wait until it is gone (``pg_terminate_backend`` is false for a pid that is not
    one any more)."""
    terminate = sa.text("SELECT pg_terminate_backend(:pid)")

    def ended() -> bool:
        with engine.connect() as admin:
            return not admin.execute(terminate, {"pid": pid}).scalar_one()

    wait_until(ended, 10, 0.01, f"backend {pid} to end")


def test_a_connection_lost_when_its_statements_are_prepared_again_is_replaced(
    make_outbox: Callable[..., Outbox],
) -> None:
    """Proves the periodic re-planning of the hot path (``REPLAN_SECONDS``) survives connections the server ended:
    the start and the write-back that find their connection due for re-planning and dead each get a new one and
    record their attempt, instead of failing on the dead one."""
    outbox, (first, second), claimed = _claimed(make_outbox, "hp-replan")
    store = outbox.store
    assert store._hot is not None
    relaxed = store._relaxed is not None
    assert store.start(first, claimed[first], "job", "w", 60) is not None
    assert store.complete_many([(first, claimed[first], 1)]) == {first}
    dead = [store._hot._held(relaxed, START_LANE), store._hot._held(False)]
    for held in dead:
        _end_backend(outbox.engine, held.cursor.connection.info.backend_pid)
        held.replan_at = 0.0
    assert store.start(second, claimed[second], "job", "w", 60) is not None
    assert store.complete_many([(second, claimed[second], 2)]) == {second}
    assert [outbox.get(i).output for i in (first, second)] == [1, 2]
    assert store._hot._held(relaxed, START_LANE) is not dead[0] and store._hot._held(False) is not dead[1]


@pytest.mark.parametrize("one_statement", [True, False], ids=["one-statement", "pipelined"])
def test_starts_grouped_in_one_round_trip_are_each_fenced(
    make_outbox: Callable[..., Outbox], monkeypatch: pytest.MonkeyPatch, one_statement: bool
) -> None:
    """Guarantee 3 for the starts of a threads pool sent together, in both forms a group takes (one statement from
    ``START_MANY_MIN`` starts, one statement each below): in one group, the attempt that holds its row starts
    (under its own worker name, for the first caller that asked for it); a duplicate of it, an attempt number that
    never held a row, a canceled command and a command whose target is paused start nothing; each caller gets
    its own answer, in order."""
    monkeypatch.setattr(starts_mod, "START_MANY_MIN", 2 if one_statement else 100)
    outbox, (held, canceled), claimed = _claimed(make_outbox, "hp-group")
    store = outbox.store
    assert outbox.cancel(canceled)

    @outbox.command(target="hp-group-paused")
    def other(n: int) -> int:
        return n

    paused = other.push(outbox.engine, 3)
    claimed.update({d.id: d.attempt for d in store.claim(10, 60)})
    assert outbox.pause(target="hp-group-paused")
    lease = timedelta(seconds=90)
    wanted = [
        (held, claimed[held] + 1, "job", "w-stale", lease),
        (held, claimed[held], "job", "w-one", lease),
        (canceled, claimed[canceled], "job", "w-canceled", lease),
        (held, claimed[held], "job", "w-again", lease),  # the same message delivered twice, in the same group
        (paused, claimed[paused], "other", "w-paused", lease),
    ]
    answers = store._start_many(wanted)
    assert [a is not None for a in answers] == [False, True, False, False, False]
    assert answers[1] is not None and (answers[1].id, answers[1].input) == (held, {"n": 1})
    row = outbox.get(held)
    assert (row.status, row.worker) == ("running", "w-one")
    assert row.lease_expires_at is not None and row.started_at is not None
    assert 85 < (row.lease_expires_at - row.started_at).total_seconds() <= 90
    assert outbox.get(canceled).status == "canceled"
    assert outbox.get(paused).status == "dispatched"


def test_the_starts_of_a_process_share_one_connection(make_outbox: Callable[..., Outbox]) -> None:
    """Proves a threads pool does not hold a database connection per handler thread for its starts: four
    threads, alive together, each start an attempt, and the database sees one session that ran the start
    statement (each attempt still started, under its own worker name)."""
    outbox = make_outbox()
    assert outbox.store._hot is not None, "this outbox must use the hot path"

    @outbox.command(target="hp-lane")
    def job(n: int) -> int:
        return n

    ids = [job.push(outbox.engine, n) for n in range(4)]
    claimed = {d.id: d.attempt for d in outbox.store.claim(10, 60)}
    started: dict[uuid.UUID, bool] = {}
    all_started = threading.Barrier(len(ids))

    def start(command_id: uuid.UUID, worker: str) -> None:
        started[command_id] = outbox.store.start(command_id, claimed[command_id], "job", worker, 60) is not None
        all_started.wait(10)  # every thread still alive when the sessions are counted below

    threads = [threading.Thread(target=start, args=(i, f"w{n}")) for n, i in enumerate(ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert started == dict.fromkeys(ids, True)
    assert sorted(outbox.get(i).worker or "" for i in ids) == ["w0", "w1", "w2", "w3"]
    table = outbox.store.table.name
    with outbox.engine.connect() as conn:
        sessions = conn.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE query LIKE :start"),
            {"start": f"UPDATE {table} SET status=%started_at%"},
        ).scalar_one()
    assert sessions == 1


class _NoticedLock:
    """A lock that tells when a second caller comes for it while it is held."""

    def __init__(self, noticed: threading.Event) -> None:
        self.lock, self._noticed = threading.Lock(), noticed

    def __enter__(self) -> None:
        if self.lock.locked():
            self._noticed.set()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_a_batch_read_on_another_thread_keeps_its_connection_until_read(
    make_outbox: Callable[..., Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves a batch of successes sent without waiting (a prefork child's write-back) and read on another thread
    (the write-back's own, once the child went idle) holds its connection until that read ends: the sender's next
    batch on the same connection, asked for during the read, waits for it instead of going out on a connection
    another thread is reading (which left the reader's pipeline busy, failed both and dropped the connection).
    Both batches are recorded, each caller gets its own answer, and the connection is kept."""
    outbox, (first, second), claimed = _claimed(make_outbox, "hp-inflight")
    store, table = outbox.store, outbox.store.table
    assert store._hot is not None
    for command_id in (first, second):
        assert store.start(command_id, claimed[command_id], "job", "w", 60) is not None
    sent, go, moved_on = threading.Event(), threading.Event(), threading.Event()
    answers: dict[str, Any] = {}
    held: list[Any] = []

    def sender() -> None:  # the handler's thread: a batch sent, later the next one on the same connection
        answer = store.complete_many_soon([(first, claimed[first], 1)])
        held.append(store._hot._conns[threading.get_ident(), False])
        answers["read"] = answer
        sent.set()
        go.wait(10)
        send_pipeline = hotpath._send_pipeline

        def sending(*args: Any, **kwargs: Any) -> None:
            send_pipeline(*args, **kwargs)
            moved_on.set()  # went out during the other thread's read

        monkeypatch.setattr(hotpath, "_send_pipeline", sending)
        try:
            answers["second"] = store.complete_many([(second, claimed[second], 2)])
        except Exception as exc:
            answers["second"] = exc
        finally:
            held.append(store._hot._conns.get((threading.get_ident(), False)))

    def reader() -> None:  # the write-back's thread: reads the batch sent by the other
        try:
            answers["first"] = answers["read"]()
        except Exception as exc:
            answers["first"] = exc

    with outbox.engine.connect() as admin:
        admin.begin()
        admin.execute(sa.select(table.c.id).where(table.c.id == first).with_for_update())  # the batch waits on it
        sending_thread = threading.Thread(target=sender, daemon=True)
        sending_thread.start()
        assert sent.wait(10)
        inflight = held[0].inflight
        inflight._lock = _NoticedLock(moved_on)  # a second caller of wait(): the sender waiting for the read
        reading_thread = threading.Thread(target=reader, daemon=True)
        reading_thread.start()
        wait_until(inflight._lock.lock.locked, 10, 0.005, "the other thread to read the batch")
        go.set()
        assert moved_on.wait(10), "the sender neither sent nor waited"
        admin.rollback()
    reading_thread.join(20)
    sending_thread.join(20)
    assert (answers.get("first"), answers.get("second")) == ({first}, {second})
    assert held[1] is held[0], "the connection was dropped"
    assert [outbox.get(i).output for i in (first, second)] == [1, 2]
