"""Cancellation of running commands, heartbeats, unique keys and hidden input, on PostgreSQL.

Workers here are Celery's in-process test workers on the memory broker; the row in
PostgreSQL is what every assertion reads.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from celery import signals
from sqlalchemy.orm import Session

from orch_outbox import CommandCanceled, LeaseLost, Outbox, UniqueConflict, current
from orch_outbox.testing import wait_for_status, wait_until

from .support import FakeClock, unique_target
from conftest import run_worker

pytestmark = pytest.mark.pg

WAIT = 20.0


def _spin(stop: threading.Event, seconds: float) -> None:
    """Busy Python work (not one long C call), so an interruption lands at once."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.01)


# -- cancellation of a running command ------------------------------------------------------


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_cancel_running_interrupts_handler_and_records_canceled(make_outbox: Callable[..., Outbox], pool: str) -> None:
    """Proves: cancel() of a running command interrupts the handler promptly (broadcast for the threads pool,
    the worker's cancel watch for solo, where the consumer is busy), the row ends `canceled` with outcome
    `canceled`, and its on-cancel command is enqueued exactly once."""
    outbox = make_outbox()
    target = unique_target("cancel")
    started = threading.Event()
    interrupted = threading.Event()
    never = threading.Event()

    @outbox.command(target=target, timeout=60, retries=3)
    def long_job(n: int) -> str:
        started.set()
        try:
            _spin(never, 45)
        except CommandCanceled:
            interrupted.set()
            raise
        return "finished"

    @outbox.command(target=target)
    def note_cancel(n: int) -> int:
        return n

    @long_job.if_canceled
    def _(outcome: Any) -> list[Any]:
        return [note_cancel.s(outcome.input["n"])]

    with run_worker(outbox.app, [target], pool=pool, concurrency=2):
        command_id = long_job.push(outbox.engine, 7)
        outbox.relay_once()
        assert started.wait(WAIT), "the handler never started"
        asked = time.monotonic()
        assert outbox.cancel(command_id) is True
        info = wait_for_status(outbox, command_id, "canceled", timeout=WAIT)
        took = time.monotonic() - asked
        assert interrupted.is_set(), "the handler was not interrupted"
        assert took < 10, f"cancellation took {took:.1f}s"
        assert info.outcome == "canceled" and info.output is None and info.cancel_requested_at is not None
        [child] = outbox.children(command_id)
        assert child.name == "note_cancel" and child.input == {"n": 7}
        outbox.relay_once()
        wait_for_status(outbox, child.id, "completed", timeout=WAIT)
    assert outbox.cancel(command_id) is False  # final: nothing more to cancel
    assert len(outbox.children(command_id)) == 1


def test_heartbeat_reports_cancellation_to_a_cooperative_handler(make_outbox: Callable[..., Outbox]) -> None:
    """Proves: a handler calling current().heartbeat() learns of a cancellation there (CommandCanceled),
    even with nothing interrupting it from outside, and the command ends canceled."""
    outbox = make_outbox()
    target = unique_target("hb")
    started = threading.Event()
    seen: list[str] = []

    @outbox.command(target=target, timeout=30)
    def cooperative() -> None:
        started.set()
        for _ in range(2000):
            try:
                current().heartbeat(30)
            except CommandCanceled:
                seen.append("canceled")
                raise
            time.sleep(0.005)

    command_id = cooperative.push(outbox.engine)
    # No worker-side interruption: only the heartbeat may tell the handler.
    import orch_outbox.executor as executor

    original = executor.RUNNING.interrupt
    executor.RUNNING.interrupt = lambda key: False  # type: ignore[method-assign]
    try:
        with run_worker(outbox.app, [target], pool="threads", concurrency=2):
            outbox.relay_once()
            assert started.wait(WAIT)
            outbox.cancel(command_id)
            info = wait_for_status(outbox, command_id, "canceled", timeout=WAIT)
    finally:
        executor.RUNNING.interrupt = original  # type: ignore[method-assign]
    assert seen == ["canceled"]
    assert info.outcome == "canceled"


def test_heartbeat_extends_timeout_and_lease(make_outbox: Callable[..., Outbox]) -> None:
    """Proves: heartbeat(seconds) moves both the handler's timeout and the run lease (database clock):
    a handler with timeout=1 that heartbeats runs to completion after 2 s instead of timing out, and
    the lease it wrote lies ~seconds + lock buffer after the heartbeat."""
    outbox = make_outbox(lock_buffer=2.0)
    target = unique_target("hb")
    leases: list[Any] = []

    @outbox.command(target=target, timeout=1, retries=0)
    def long_but_alive() -> str:
        never = threading.Event()
        for _ in range(4):
            current().heartbeat(30)
            row = outbox.store.get(current().id)
            assert row is not None
            leases.append((row["lease_expires_at"], outbox.store.now()))
            _spin(never, 0.5)
        return "done"

    command_id = long_but_alive.push(outbox.engine)
    with run_worker(outbox.app, [target], pool="threads", concurrency=1):
        outbox.relay_once()
        info = wait_for_status(outbox, command_id, "completed", "failed", timeout=WAIT)
    assert info.status == "completed", info.error
    assert info.output == "done"
    for lease, now in leases:
        assert 30.0 < (lease - now).total_seconds() <= 32.5


def test_heartbeat_after_rescue_raises_lease_lost(clocked_outbox: Outbox, fake_clock: FakeClock) -> None:
    """Proves: a zombie attempt (its lease lapsed and the rescuer retried the command) learns it at its next
    heartbeat (LeaseLost) instead of extending a lease it no longer holds."""
    outbox = clocked_outbox

    @outbox.command(target=unique_target("z"), timeout=5, retries=2)
    def job() -> None: ...

    command_id = job.push(outbox.engine)
    [dispatch] = outbox.store.claim(10, 30)
    started = outbox.store.start(command_id, dispatch.attempt, "job", "w1", 5 + 2)
    assert started is not None
    assert outbox.store.heartbeat(command_id, dispatch.attempt, 10) == (True, False)
    fake_clock.advance(60)
    assert outbox.rescue_once() == 1
    assert outbox.store.heartbeat(command_id, dispatch.attempt, 10) == (False, False)

    from orch_outbox.running import Guard

    with pytest.raises(LeaseLost):
        outbox.executor._heartbeat(started, Guard(5), 10)


def test_rescuer_settles_lapsed_canceled_run_as_canceled(clocked_outbox: Outbox, fake_clock: FakeClock) -> None:
    """Proves: a command canceled while running whose worker then died ends `canceled` (not retried) once its
    lease lapses, with its on-cancel command enqueued once."""
    outbox = clocked_outbox

    @outbox.command(target=unique_target("r"), timeout=5, retries=3)
    def job() -> None: ...

    @outbox.command(target=unique_target("r"))
    def after() -> None: ...

    @job.if_canceled
    def _(outcome: Any) -> list[Any]:
        return [after.s()]

    command_id = job.push(outbox.engine)
    [dispatch] = outbox.store.claim(10, 30)
    assert outbox.store.start(command_id, dispatch.attempt, "job", "w1", 7) is not None
    assert outbox.cancel(command_id) is True
    assert outbox.get(command_id).status == "running"  # still running until its worker or the rescuer says so
    assert outbox.rescue_once() == 0
    fake_clock.advance(8)
    assert outbox.rescue_once() == 1
    info = outbox.get(command_id)
    assert (info.status, info.outcome, info.retries_left) == ("canceled", "canceled", 3)
    assert [c.name for c in outbox.children(command_id)] == ["after"]
    assert outbox.rescue_once() == 0


# -- unique keys ------------------------------------------------------------------------------


def test_unique_key_returns_the_unfinished_holder(outbox: Outbox) -> None:
    """Proves (SQLite and PostgreSQL): pushing a key held by an unfinished command returns that command's id
    and inserts nothing; once the holder is final, the key is free again."""

    @outbox.command(target="u")
    def sync_account(account: int) -> None: ...

    with Session(outbox.engine) as session, session.begin():
        first = sync_account.options(unique_key="acct-1").push(session, 1)
        again = sync_account.options(unique_key="acct-1").push(session, 1)
        other = sync_account.options(unique_key="acct-2").push(session, 2)
    assert again == first and other != first
    with Session(outbox.engine) as session, session.begin():
        assert sync_account.options(unique_key="acct-1").push(session, 1) == first
        [a, b, c] = outbox.push_many(
            session,
            [sync_account.s(1).set(unique_key="acct-1"), sync_account.s(3), sync_account.s(2).set(unique_key="acct-2")],
        )
    assert a == first and c == other and b not in (first, other)
    assert outbox.cancel(first)
    with Session(outbox.engine) as session, session.begin():
        fresh = sync_account.options(unique_key="acct-1").push(session, 1)
    assert fresh != first
    with outbox.engine.connect() as conn:
        t = outbox.store.table
        keyed = conn.execute(sa.select(t.c.unique_key, t.c.status).where(t.c.unique_key.is_not(None))).all()
    assert sorted(keyed) == [("acct-1", "canceled"), ("acct-1", "pending"), ("acct-2", "pending")]


def test_unique_key_with_other_input_is_a_conflict_and_tx_stays_usable(outbox: Outbox) -> None:
    """Proves: the same key with a different input raises UniqueConflict naming the holder, before anything
    is written, and the caller's transaction is still usable (a later push in it commits)."""

    @outbox.command(target="u")
    def sync_account(account: int) -> None: ...

    holder = sync_account.options(unique_key="k").push(outbox.engine, 1)
    with Session(outbox.engine) as session, session.begin():
        with pytest.raises(UniqueConflict, match=str(holder)):
            sync_account.options(unique_key="k").push(session, 2)
        kept = sync_account.push(session, 3)
    assert outbox.get(kept).status == "pending"
    with outbox.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(outbox.store.table)).scalar_one() == 2


@pytest.mark.parametrize("first_tx_ends", ["commit", "rollback"])
def test_unique_key_under_concurrent_transactions(make_outbox: Callable[..., Outbox], first_tx_ends: str) -> None:
    """Proves: two transactions pushing one key at once never create two unfinished commands. The second
    waits for the first: if the first commits, the second gets its id; if it rolls back, the second's own
    command is inserted (a rolled-back push never holds a key)."""
    outbox = make_outbox()

    @outbox.command(target="u")
    def sync_account(account: int) -> None: ...

    first = Session(outbox.engine)
    first.begin()
    first_id = sync_account.options(unique_key="shared").push(first, 1)
    result: list[Any] = []

    def second() -> None:
        try:
            with Session(outbox.engine) as session, session.begin():
                result.append(sync_account.options(unique_key="shared").push(session, 1))
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    table = outbox.store.table.name

    def second_is_waiting() -> bool:
        with outbox.engine.connect() as conn:
            waiting = conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE :q"),
                {"q": f"INSERT INTO {table}%"},
            ).scalar_one()
        return bool(waiting)

    wait_until(second_is_waiting, timeout=WAIT, what="the second push waiting on the first")
    if first_tx_ends == "commit":
        first.commit()
    else:
        first.rollback()
    first.close()
    thread.join(WAIT)
    assert len(result) == 1 and isinstance(result[0], uuid.UUID), result
    with outbox.engine.connect() as conn:
        rows = conn.execute(sa.select(outbox.store.table.c.id)).scalars().all()
    if first_tx_ends == "commit":
        assert result[0] == first_id and rows == [first_id]
    else:
        assert result[0] != first_id and rows == [result[0]]


# -- secret input -----------------------------------------------------------------------------


def test_hidden_input_stays_out_of_the_message(make_outbox: Callable[..., Outbox]) -> None:
    """Proves: a command declared hide_input=True is published with no arguments in the message (what the
    broker, worker logs and Flower see), while its handler still receives the input from the row."""
    outbox = make_outbox()
    target = unique_target("secret")
    received: list[str] = []

    @outbox.command(target=target, hide_input=True)
    def set_password(user: str, password: str) -> None:
        received.append(password)

    published: list[tuple[Any, Any]] = []

    def capture(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
        if sender == "set_password":
            published.append((body, headers))

    signals.before_task_publish.connect(capture, weak=False)
    try:
        command_id = set_password.push(outbox.engine, "ada", "hunter2")
        with run_worker(outbox.app, [target]):
            outbox.relay_once()
            wait_for_status(outbox, command_id, "completed", timeout=WAIT)
    finally:
        signals.before_task_publish.disconnect(capture)
    [(body, headers)] = published
    assert "hunter2" not in repr(body) and "hunter2" not in repr(headers)
    assert headers["kwargsrepr"] == "<hidden>"
    assert received == ["hunter2"]


def test_published_message_shows_the_input_to_flower(make_outbox: Callable[..., Outbox]) -> None:
    """Flower and worker logs show a command's arguments: the message carries the input as kwargs and its
    repr as ``kwargsrepr`` (cut at Celery's ``kwargsrepr_maxsize``), and no positional arguments."""
    outbox = make_outbox()

    @outbox.command(target=unique_target("shown"))
    def greet(user: str, note: str) -> None: ...

    published: list[tuple[Any, Any]] = []

    def capture(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
        if sender == "greet":
            published.append((body, headers))

    signals.before_task_publish.connect(capture, weak=False)
    try:
        greet.push(outbox.engine, "ada", "hi")
        greet.push(outbox.engine, "bob", "x" * 5000)
        assert outbox.relay_once() == 2
    finally:
        signals.before_task_publish.disconnect(capture)
    [(body, headers)] = [(b, h) for b, h in published if b[1]["user"] == "ada"]
    [long_headers] = [h for b, h in published if b[1]["user"] == "bob"]
    assert tuple(body[0]) == () and body[1] == {"user": "ada", "note": "hi"}
    assert (headers["argsrepr"], headers["kwargsrepr"]) == ("()", repr(body[1]))
    limit = outbox.app.amqp.kwargsrepr_maxsize
    assert len(long_headers["kwargsrepr"]) == limit and long_headers["kwargsrepr"].endswith("...")
