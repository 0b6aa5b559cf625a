"""Write-behind of successes in a worker: batched, fenced, and flushed before the worker exits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker

from orch_outbox import Outbox
from orch_outbox.testing import wait_until

from .support import unique_target


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_successes_go_through_the_write_behind_and_are_flushed_at_shutdown(
    make_outbox: Callable[..., Outbox], pool: str
) -> None:
    """In a threads-pool worker, plain successes are recorded by the write-behind (complete_many), none one by
    one; in a solo (or prefork) worker each is recorded before the next message. When the worker stops right
    after the last handler returned, every success is already recorded (the shutdown flush), without any
    wait after the worker is gone."""
    outbox = make_outbox()
    target = unique_target("wb")
    ran: list[int] = []
    lock = threading.Lock()

    @outbox.command(target=target, retries=0)
    def job(n: int) -> int:
        with lock:
            ran.append(n)
        return n

    batched: list[int] = []
    single: list[Any] = []
    store = outbox.store
    complete_many, complete = store.complete_many, store.complete

    def counting_many(items: Any) -> set[Any]:
        batched.append(len(items))
        return complete_many(items)

    def counting_single(*args: Any, **kwargs: Any) -> bool:
        single.append(args)
        return complete(*args, **kwargs)

    store.complete_many = counting_many  # type: ignore[method-assign]
    store.complete = counting_single  # type: ignore[method-assign]
    ids = outbox.push_many(outbox.engine, [job.s(n) for n in range(60)])
    outbox.app.conf.broker_transport_options = {"polling_interval": 0.02}
    with start_worker(outbox.app, pool=pool, concurrency=4 if pool == "threads" else 1, queues=[target],
                      perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
        outbox.relay_once()
        wait_until(lambda: len(ran) == 60, 30, what="every handler to run")
    rows = [outbox.get(i) for i in ids]
    assert [(r.status, r.output) for r in rows] == [("completed", n) for n in range(60)]
    if pool == "threads":
        assert sum(batched) == 60 and single == []
    else:
        assert batched == [] and len(single) == 60


def test_a_stale_success_in_the_write_behind_changes_nothing(make_outbox: Callable[..., Outbox]) -> None:
    """A success handed to the write-behind for an attempt that no longer holds its command (rescued, or
    retried elsewhere) is fenced out: the row keeps its state and the drop is counted."""
    outbox = make_outbox()

    @outbox.command(target=unique_target("wb"))
    def job(n: int) -> int:
        return n

    command_id = job.push(outbox.engine, 1)
    (claimed,) = outbox.store.claim(10, 60.0)
    started = outbox.store.start(claimed.id, claimed.attempt, claimed.name, "w", 60.0)
    assert started is not None
    stale = type(started)(**{**vars(started), "attempt": started.attempt + 1})
    executor = outbox.executor
    executor.start_write_behind()
    executor.write_behind.submit(stale, 1)  # type: ignore[union-attr]
    assert executor.flush(10)
    assert executor.dropped["fenced"] == 1
    assert outbox.get(command_id).status == "running"
    executor.write_behind.submit(started, 1)  # type: ignore[union-attr]
    assert executor.flush(10)
    assert (outbox.get(command_id).status, outbox.get(command_id).output) == ("completed", 1)


def test_complete_many_records_only_the_attempts_that_still_hold_their_rows(make_outbox: Callable[..., Outbox]) -> None:
    """Guarantee 3 for the batched write-back: of five successes handed over, the two whose attempt no longer
    holds its row (canceled meanwhile; a stale attempt number) change nothing; the three others are recorded
    with their outputs, in one call."""
    outbox = make_outbox()
    store = outbox.store

    @outbox.command(target=unique_target("wb-fence"))
    def job(n: int) -> int:
        return n

    ids = outbox.push_many(outbox.engine, [job.s(n) for n in range(5)])
    claimed = {d.id: d for d in store.claim(10, 60)}
    for command_id in ids:
        assert store.start(command_id, claimed[command_id].attempt, "job", "w", 60) is not None
    assert store.canceled(ids[3], claimed[ids[3]].attempt, [])  # the attempt was canceled meanwhile
    items = [(cid, claimed[cid].attempt, {"n": i}) for i, cid in enumerate(ids)]
    items[4] = (ids[4], claimed[ids[4]].attempt + 1, {"n": 4})  # an attempt that never held the row
    assert store.complete_many(items) == {ids[0], ids[1], ids[2]}
    assert [outbox.get(i).status for i in ids] == ["completed", "completed", "completed", "canceled", "running"]
    assert [outbox.get(i).output for i in ids[:3]] == [{"n": 0}, {"n": 1}, {"n": 2}]
