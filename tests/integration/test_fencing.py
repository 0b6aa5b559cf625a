"""Guarantee 3 on PostgreSQL: write-backs are fenced by (id, status, attempt).

These tests drive the store the way a worker, a duplicate message, a zombie worker and
the rescuer would, with an injected clock (``Outbox(clock=...)``) so leases lapse when
the test says so, not after a sleep.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox
from orch_outbox.store import ErrorInfo

from .support import FakeClock, unique_target

pytestmark = pytest.mark.pg

DISPATCH_TIMEOUT = 30.0
LEASE = 5.0


@pytest.fixture
def commands(clocked_outbox: Outbox) -> Any:
    outbox = clocked_outbox
    target = unique_target("fence")

    @outbox.command(target=target, retries=1, timeout=3)
    def charge(amount: int) -> int:
        raise AssertionError("run by hand in these tests")

    @outbox.command(target=target, retries=2, timeout=3)
    def fragile(n: int) -> None:
        raise AssertionError("run by hand in these tests")

    @outbox.command(target=target)
    def on_lost(n: int) -> None:
        raise AssertionError("never run")

    @fragile.if_failed
    def _alarm(outcome: Any) -> list[Any]:
        return [on_lost.s(outcome.input["n"])]

    class Commands:
        pass

    c = Commands()
    c.charge, c.fragile, c.on_lost = charge, fragile, on_lost  # type: ignore[attr-defined]
    return c


def row(outbox: Outbox, command_id: uuid.UUID) -> dict[str, Any]:
    found = outbox.store.get(command_id)
    assert found is not None
    return dict(found)


def push(outbox: Outbox, call: Any) -> uuid.UUID:
    return outbox.push(outbox.engine, call)


def claim_one(outbox: Outbox, command_id: uuid.UUID) -> int:
    """Claim the only due command; returns its attempt number."""
    claimed = outbox.store.claim(10, DISPATCH_TIMEOUT)
    assert [d.id for d in claimed] == [command_id]
    return claimed[0].attempt


def test_duplicate_wrong_attempt_and_zombie_write_backs_change_nothing(
    clocked_outbox: Outbox, fake_clock: FakeClock, commands: Any
) -> None:
    """Guarantee 3: only the attempt holding the command records an outcome.

    Sequence: attempt 1 starts; a duplicate message for attempt 1 cannot start it again;
    a write-back naming attempt 2 is refused; the lease lapses and the rescuer retries
    it (outcome ``lost``); the zombie attempt 1 then writes back ``completed`` and is
    refused; attempt 2 is dispatched, started and completes. Fails if any of the
    refused writes returned True or changed the row (e.g. a fence without ``attempt``
    or without ``status = 'running'``).
    """
    outbox, store = clocked_outbox, clocked_outbox.store
    cid = push(outbox, commands.charge.s(100))
    assert claim_one(outbox, cid) == 1

    started = store.start(cid, 1, "charge", "w1", LEASE)
    assert started is not None
    assert (started.attempt, started.input, started.retries_left) == (1, {"amount": 100}, 1)
    # a duplicate delivery of the same message: not this attempt's to run any more
    assert store.start(cid, 1, "charge", "w2", LEASE) is None
    # a forged message naming another command for the same id/attempt
    assert store.start(cid, 1, "on_lost", "w2", LEASE) is None
    before = row(outbox, cid)
    assert (before["status"], before["worker"]) == ("running", "w1")

    # write-backs naming an attempt that does not hold the command
    assert store.complete(cid, 2, {"paid": True}, []) is False
    assert store.fail(cid, 2, "failure", ErrorInfo("E", "x"), []) is False
    assert store.retry(cid, 2, "failure", ErrorInfo("E", "x"), 0.0) is False
    assert row(outbox, cid) == before

    # the rescuer does not touch a live lease
    fake_clock.advance(LEASE - 1)
    assert outbox.rescue_once() == 0
    assert row(outbox, cid) == before

    # the lease lapses: attempt 1 is lost, retried
    fake_clock.advance(2)
    assert outbox.rescue_once() == 1
    lost = row(outbox, cid)
    assert (lost["status"], lost["outcome"], lost["attempt"], lost["retries_left"]) == ("pending", "lost", 1, 0)
    assert lost["error_type"] == "LeaseExpired"

    # the zombie worker of attempt 1 finishes late: fenced out
    assert store.complete(cid, 1, {"paid": True}, []) is False
    assert store.fail(cid, 1, "failure", ErrorInfo("E", "late"), []) is False
    assert store.retry(cid, 1, "failure", ErrorInfo("E", "late"), 0.0) is False
    assert row(outbox, cid) == lost

    # the redispatched attempt 2 runs; the zombie still cannot write, attempt 2 can
    assert claim_one(outbox, cid) == 2
    assert store.start(cid, 1, "charge", "w1", LEASE) is None
    assert store.start(cid, 2, "charge", "w3", LEASE) is not None
    assert store.complete(cid, 1, {"paid": "zombie"}, []) is False
    assert store.complete(cid, 2, {"paid": True}, []) is True
    done = outbox.get(cid)
    assert (done.status, done.outcome, done.output, done.attempt, done.worker) == (
        "completed",
        "success",
        {"paid": True},
        2,
        "w3",
    )
    assert done.error is None
    # and nothing moves a final row
    assert store.complete(cid, 2, {"paid": "again"}, []) is False
    assert store.start(cid, 2, "charge", "w4", LEASE) is None
    fake_clock.advance(3600)
    assert outbox.rescue_once() == 0
    assert outbox.get(cid).output == {"paid": True}


def test_lapsed_dispatch_returns_to_pending_without_consuming_a_retry(
    clocked_outbox: Outbox, fake_clock: FakeClock, commands: Any
) -> None:
    """Lifecycle ``dispatched → pending`` (message lost): no retry is consumed, and it is redispatched.

    Fails if the rescuer counted a never-started message as a failed attempt
    (``retries_left`` would drop) or left the row dispatched forever.
    """
    outbox, store = clocked_outbox, clocked_outbox.store
    cid = push(outbox, commands.charge.s(5))
    for expected_attempt in (1, 2, 3):
        assert claim_one(outbox, cid) == expected_attempt
        fake_clock.advance(DISPATCH_TIMEOUT - 1)
        assert outbox.rescue_once() == 0
        assert row(outbox, cid)["status"] == "dispatched"
        fake_clock.advance(2)
        assert outbox.rescue_once() == 1
        released = row(outbox, cid)
        assert (released["status"], released["retries_left"], released["lease_expires_at"]) == ("pending", 1, None)
        assert released["outcome"] is None
    # the message of a released attempt arrives late: it may not start the command
    assert store.start(cid, 3, "charge", "w1", LEASE) is None
    assert claim_one(outbox, cid) == 4
    assert store.start(cid, 4, "charge", "w1", LEASE) is not None


def test_undispatch_of_a_stale_attempt_does_nothing(
    clocked_outbox: Outbox, fake_clock: FakeClock, commands: Any
) -> None:
    """Guarantee 3 for the relay's own write: ``undispatch`` is fenced by attempt and status.

    A slow relay whose publish failed after its dispatch lease lapsed and the row was
    redispatched (attempt 2), or after a worker already started it, must not put the row
    back to pending. Fails if undispatch matched on id alone.
    """
    outbox, store = clocked_outbox, clocked_outbox.store
    cid = push(outbox, commands.charge.s(7))
    stale = store.claim(10, DISPATCH_TIMEOUT)
    assert [(d.id, d.attempt) for d in stale] == [(cid, 1)]
    fake_clock.advance(DISPATCH_TIMEOUT + 1)
    assert outbox.rescue_once() == 1
    fresh = store.claim(10, DISPATCH_TIMEOUT)
    assert [(d.id, d.attempt) for d in fresh] == [(cid, 2)]

    before = row(outbox, cid)
    assert store.undispatch(stale) == 0
    assert row(outbox, cid) == before

    assert store.start(cid, 2, "charge", "w1", LEASE) is not None
    running = row(outbox, cid)
    assert store.undispatch(fresh) == 0
    assert row(outbox, cid) == running


def test_worker_that_keeps_dying_ends_failed_lost_after_retries_plus_one_attempts(
    clocked_outbox: Outbox, fake_clock: FakeClock, commands: Any
) -> None:
    """Guarantees 2 and 3: a command whose worker dies on every attempt ends ``failed``/``lost``.

    retries=2: three attempts each start and then stop reporting; the rescuer retries the
    first two and fails the third, enqueuing the ``if_failed`` command exactly once.
    Fails if lost attempts did not consume retries (an endless redispatch loop), if the
    on-failure command were inserted at every lost attempt or more than once, or if
    the failed row could still be claimed or rescued.
    """
    outbox, store = clocked_outbox, clocked_outbox.store
    cid = push(outbox, commands.fragile.s(42))
    seen = []
    for attempt in (1, 2, 3):
        assert claim_one(outbox, cid) == attempt
        started = store.start(cid, attempt, "fragile", f"w{attempt}", LEASE)
        assert started is not None
        seen.append(started.retries_left)
        assert outbox.children(cid) == []
        fake_clock.advance(LEASE + 1)  # the worker died: no heartbeat, no write-back
        assert outbox.rescue_once() == 1
    assert seen == [2, 1, 0]

    final = outbox.get(cid)
    assert (final.status, final.outcome, final.attempt, final.retries_left) == ("failed", "lost", 3, 0)
    assert final.error is not None and final.error.type == "LeaseExpired"
    assert final.finished_at is not None

    children = outbox.children(cid)
    assert [(c.name, c.input, c.status) for c in children] == [("on_lost", {"n": 42}, "pending")]

    # no endless loop: nothing is redispatched, nothing more is rescued or chained
    fake_clock.advance(3600)
    assert outbox.rescue_once() == 0
    claimed = store.claim(10, DISPATCH_TIMEOUT)
    assert [d.name for d in claimed] == ["on_lost"]
    assert outbox.get(cid).status == "failed"
    assert len(outbox.children(cid)) == 1
    # the last zombie cannot resurrect it
    assert store.complete(cid, 3, None, []) is False


def test_two_rescuers_settle_a_lapsed_run_once(clocked_outbox: Outbox, fake_clock: FakeClock, commands: Any) -> None:
    """Guarantee 3 for the rescuer: two rescuers racing over the same lapsed final attempt fail it once.

    Both read the lapsed row; only one fenced write may succeed, so the on-failure
    command is inserted once. Fails if the rescuer's failure write were not fenced by
    attempt and status.
    """
    outbox, store = clocked_outbox, clocked_outbox.store
    cid = push(outbox, commands.fragile.options(retries=0).s(9))
    attempt = claim_one(outbox, cid)
    assert store.start(cid, attempt, "fragile", "w1", LEASE) is not None
    fake_clock.advance(LEASE + 1)

    first = store.lapsed_runs(10)
    second = store.lapsed_runs(10)
    assert [lap.id for lap in first] == [lap.id for lap in second] == [cid]
    error = ErrorInfo("LeaseExpired", "test")
    children = outbox.chained_rows("fragile", "if_failed", _outcome(cid, "fragile", first[0].input, error))
    assert store.fail(cid, first[0].attempt, "lost", error, children, lapsed_only=True) is True
    children = outbox.chained_rows("fragile", "if_failed", _outcome(cid, "fragile", second[0].input, error))
    assert store.fail(cid, second[0].attempt, "lost", error, children, lapsed_only=True) is False
    assert len(outbox.children(cid)) == 1
    assert outbox.get(cid).status == "failed"


def test_rescuer_fence_requires_the_lease_to_have_lapsed(
    clocked_outbox: Outbox, fake_clock: FakeClock, commands: Any
) -> None:
    """Guarantee 3: the rescuer's write (``lapsed_only``) does nothing to a run whose lease is live.

    Covers a rescuer that read a lapsed lease just before the worker renewed it (here:
    a later attempt started with a fresh lease). Fails if ``lapsed_only`` were ignored.
    """
    outbox, store = clocked_outbox, clocked_outbox.store
    cid = push(outbox, commands.charge.s(1))
    claim_one(outbox, cid)
    assert store.start(cid, 1, "charge", "w1", LEASE) is not None
    error = ErrorInfo("LeaseExpired", "test")
    assert store.retry(cid, 1, "lost", error, 0.0, lapsed_only=True) is False
    assert store.fail(cid, 1, "lost", error, [], lapsed_only=True) is False
    assert row(outbox, cid)["status"] == "running"
    with outbox.engine.connect() as conn:
        t = store.table
        lease = conn.execute(sa.select(t.c.lease_expires_at).where(t.c.id == cid)).scalar_one()
    assert lease == fake_clock() + _seconds(LEASE)


def _outcome(cid: uuid.UUID, name: str, data: dict[str, Any], error: ErrorInfo) -> Any:
    from orch_outbox import Outcome

    return Outcome(cid, name, data, None, error)


def _seconds(value: float) -> Any:
    import datetime as dt

    return dt.timedelta(seconds=value)
