"""Guarantee 4 on PostgreSQL: a final state and its chained commands commit together.

The end-to-end tests run commands on an in-process Celery worker (kombu's in-memory
broker) and wait with ``orch_outbox.testing.drain``; the store-level tests hold a
completing transaction open (a blocking ``store.insert``) and look from another
connection.
"""

from __future__ import annotations

import threading
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox, Outcome
from orch_outbox.store import ErrorInfo
from orch_outbox.testing import drain

from .support import run_worker, unique_target

pytestmark = pytest.mark.pg

EVENT_TIMEOUT = 10.0


class HookError(RuntimeError):
    pass


@pytest.fixture
def chain(pg_outbox: Outbox) -> types.SimpleNamespace:
    """``step`` (fails on request) chains ``after`` on success and ``on_fail`` on failure."""
    outbox = pg_outbox
    target = unique_target("chain")
    ran: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def record(name: str, value: Any) -> None:
        with lock:
            ran.append((name, value))

    @outbox.command(target=target, retries=0, timeout=10)
    def step(n: int, fail: bool = False) -> int:
        record("step", n)
        if fail:
            raise ValueError(f"step {n} failed")
        return n * 10

    @outbox.command(target=target, retries=0, timeout=10)
    def after(total: int) -> None:
        record("after", total)

    @outbox.command(target=target, retries=0, timeout=10)
    def on_fail(n: int, error_type: str) -> None:
        record("on_fail", n)

    @step.then
    def _then(outcome: Outcome) -> list[Any]:
        return [after.s(outcome.output)]

    @step.if_failed
    def _failed(outcome: Outcome) -> list[Any]:
        assert outcome.error is not None
        return [on_fail.s(outcome.input["n"], outcome.error.type)]

    return types.SimpleNamespace(target=target, step=step, after=after, on_fail=on_fail, ran=ran)


@pytest.fixture
def worker(pg_outbox: Outbox, chain: types.SimpleNamespace) -> Iterator[Any]:
    with run_worker(pg_outbox.app, queues=[chain.target]) as w:
        yield w


def push(outbox: Outbox, call: Any) -> uuid.UUID:
    return outbox.push(outbox.engine, call)


def test_then_children_exist_iff_parent_completed(pg_outbox: Outbox, chain: types.SimpleNamespace, worker: Any) -> None:
    """Guarantee 4 end to end: a parent has its ``then`` child iff it completed.

    Six parents run on a real (in-process) worker, three of them fail. Fails if a
    completed parent lacks its child, a failed parent got a success child, or a child
    was inserted twice.
    """
    ids = {n: push(pg_outbox, chain.step.s(n, fail=n % 2 == 1)) for n in range(6)}
    drain(pg_outbox, timeout=30)

    for n, cid in ids.items():
        parent = pg_outbox.get(cid)
        children = pg_outbox.children(cid)
        if n % 2 == 0:
            assert (parent.status, parent.output) == ("completed", n * 10)
            assert [(c.name, c.input, c.status) for c in children] == [("after", {"total": n * 10}, "completed")]
        else:
            assert (parent.status, parent.outcome) == ("failed", "failure")
            assert [(c.name, c.input) for c in children] == [("on_fail", {"n": n, "error_type": "ValueError"})]
    assert sorted(v for k, v in chain.ran if k == "after") == [0, 20, 40]
    assert sorted(v for k, v in chain.ran if k == "on_fail") == [1, 3, 5]


def test_then_hook_that_raises_fails_the_parent_and_inserts_no_success_children(
    pg_outbox: Outbox, chain: types.SimpleNamespace, worker: Any
) -> None:
    """Guarantee 4: a ``then`` hook that raises leaves the parent not completed and chains nothing of it.

    ``step`` has two ``then`` hooks: the first returns a child, the second raises. With
    retries=0 the parent ends ``failed`` and only its ``if_failed`` child exists. Fails
    if the parent was recorded completed without its children, or if the first hook's
    child was inserted although the parent did not complete.
    """

    @chain.step.then
    def _broken(outcome: Outcome) -> list[Any]:
        raise HookError("the hook is broken")

    cid = push(pg_outbox, chain.step.s(3))
    drain(pg_outbox, timeout=30)

    parent = pg_outbox.get(cid)
    assert (parent.status, parent.outcome, parent.output) == ("failed", "failure", None)
    assert parent.error is not None
    assert parent.error.type.endswith("HookError")
    assert "the hook is broken" in parent.error.message
    children = pg_outbox.children(cid)
    assert [c.name for c in children] == ["on_fail"]
    assert [k for k, _ in chain.ran] == ["step", "on_fail"]


def test_then_hook_that_raises_with_retries_left_reschedules_without_children(
    pg_outbox: Outbox, chain: types.SimpleNamespace, worker: Any
) -> None:
    """Guarantee 4 across retries: every attempt whose hook raises inserts nothing.

    retries=2 and a hook that always raises: three attempts, then ``failed`` with one
    ``if_failed`` child. Fails if a retried attempt left a success child behind.
    """
    calls: list[int] = []

    @chain.step.then
    def _broken(outcome: Outcome) -> list[Any]:
        calls.append(len(pg_outbox.children(outcome.id)))
        raise HookError("still broken")

    cid = push(pg_outbox, chain.step.options(retries=2).s(4))
    drain(pg_outbox, timeout=30)

    assert calls == [0, 0, 0]
    parent = pg_outbox.get(cid)
    assert (parent.status, parent.attempt, parent.retries_left) == ("failed", 3, 0)
    assert [c.name for c in pg_outbox.children(cid)] == ["on_fail"]


def test_fenced_out_write_back_inserts_no_children(pg_outbox: Outbox, chain: types.SimpleNamespace) -> None:
    """Guarantees 3 + 4: a write-back refused by the fence inserts none of its chained commands.

    Fails if ``store.complete``/``store.fail`` inserted the children before (or without)
    checking that the fenced update matched a row.
    """
    store = pg_outbox.store
    cid = push(pg_outbox, chain.step.s(1))
    [d] = store.claim(10, 60)
    assert store.start(cid, d.attempt, "step", "w1", 30) is not None
    success_child = [pg_outbox.row_for(chain.after.s(10), parent_id=cid)]
    failure_child = [pg_outbox.row_for(chain.on_fail.s(1, "E"), parent_id=cid)]

    assert store.complete(cid, d.attempt + 1, 10, success_child) is False
    assert store.fail(cid, d.attempt + 1, "failure", ErrorInfo("E", "x"), failure_child) is False
    assert pg_outbox.children(cid) == []
    assert pg_outbox.get(cid).status == "running"

    assert store.complete(cid, d.attempt, 10, success_child) is True
    # a duplicate write-back of the same attempt is fenced out too: no second child
    again = [pg_outbox.row_for(chain.after.s(10), parent_id=cid)]
    assert store.complete(cid, d.attempt, 10, again) is False
    assert [c.name for c in pg_outbox.children(cid)] == ["after"]
    assert pg_outbox.unfinished() if hasattr(pg_outbox, "unfinished") else True


def test_child_insert_failure_rolls_back_the_parent_final_state(
    pg_outbox: Outbox, chain: types.SimpleNamespace
) -> None:
    """Guarantee 4: if the children cannot be written, the parent's final state is not written either.

    A chained row that violates a CHECK constraint makes the completing transaction
    fail. Fails if the parent were left ``completed`` without its child (the update
    committed separately from the insert).
    """
    store = pg_outbox.store
    cid = push(pg_outbox, chain.step.s(1))
    [d] = store.claim(10, 60)
    assert store.start(cid, d.attempt, "step", "w1", 30) is not None
    good = pg_outbox.row_for(chain.after.s(10), parent_id=cid)
    bad = {**pg_outbox.row_for(chain.after.s(11), parent_id=cid), "timeout": -1.0}

    with pytest.raises(sa.exc.IntegrityError):
        store.complete(cid, d.attempt, 10, [good, bad])

    parent = pg_outbox.get(cid)
    assert (parent.status, parent.output, parent.finished_at) == ("running", None, None)
    assert pg_outbox.children(cid) == []
    # the attempt still holds the command and can record its outcome properly
    assert store.complete(cid, d.attempt, 10, [good]) is True
    assert [c.name for c in pg_outbox.children(cid)] == ["after"]


class BlockingInsert:
    """Replaces ``store.insert``: inserts, then holds the transaction open until released."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.inserted = threading.Event()
        self.release = threading.Event()

    def __call__(self, conn: sa.Connection, rows: Any, **options: Any) -> Any:
        ids = self.real(conn, rows, **options)
        self.inserted.set()
        assert self.release.wait(EVENT_TIMEOUT), "the test never released the completing transaction"
        return ids


def _finish_in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("how", ["complete", "fail", "cancel"])
def test_children_and_final_state_become_visible_together(
    pg_outbox: Outbox, chain: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Guarantee 4: while the finishing transaction is open, neither the final state nor the children show.

    The children are inserted, then the transaction is held open; another connection
    sees the parent unchanged, no children, and a relay claims nothing. After commit
    both appear at once. Fails if the children were committed in a transaction of their
    own (before or after the parent's update).
    """
    store = pg_outbox.store
    cid = push(pg_outbox, chain.step.s(2))
    if how == "cancel":
        before_status = "pending"

        def work() -> Any:
            return pg_outbox.cancel(cid)
    else:
        [d] = store.claim(10, 60)
        assert store.start(cid, d.attempt, "step", "w1", 30) is not None
        before_status = "running"
        if how == "complete":
            rows = [pg_outbox.row_for(chain.after.s(20), parent_id=cid)]

            def work() -> Any:
                return store.complete(cid, d.attempt, 20, rows)
        else:
            rows = [pg_outbox.row_for(chain.on_fail.s(2, "ValueError"), parent_id=cid)]

            def work() -> Any:
                return store.fail(cid, d.attempt, "failure", ErrorInfo("ValueError", "x"), rows)

    blocker = BlockingInsert(store.insert)
    monkeypatch.setattr(store, "insert", blocker)
    thread, result = _finish_in_thread(work)
    try:
        assert blocker.inserted.wait(EVENT_TIMEOUT), "the finishing transaction never inserted its children"
        # seen from other connections while the finishing transaction is open
        assert store.get(cid)["status"] == before_status  # type: ignore[index]
        assert store.children(cid) == []
        assert store.claim(10, 60) == []
        assert store.unfinished() == 1
    finally:
        blocker.release.set()
        thread.join(EVENT_TIMEOUT)
    assert not thread.is_alive()
    assert result == [True]

    expected = {"complete": ("completed", "after"), "fail": ("failed", "on_fail"), "cancel": ("canceled", None)}
    status, child_name = expected[how]
    assert pg_outbox.get(cid).status == status
    assert [c.name for c in pg_outbox.children(cid)] == ([child_name] if child_name else [])
