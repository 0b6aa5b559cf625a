"""A worker's write-back: plain successes written behind the handlers, in batches, fenced, and flushed.

In a worker (every pool) a success without chained commands or a batch is handed to a
thread that writes all the successes handed over meanwhile in one transaction
(``Store.complete_many``); the handler's thread takes its next message at once. A warm
shutdown writes what is still held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker

from orch_outbox import Outbox
from orch_outbox import writeback as writeback_mod
from orch_outbox.errors import StoreUnavailable
from orch_outbox.testing import wait_until

from .support import unique_target

pytestmark = pytest.mark.pg


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_successes_go_through_the_write_back_and_are_flushed_at_shutdown(
    make_outbox: Callable[..., Outbox], pool: str
) -> None:
    """In a threads or solo worker every plain success is recorded through ``complete_many`` (by the write-back
    thread; in solo, ``complete_many_soon`` by the handler's thread), none through the one-row ``complete``.
    When the worker is stopped (warm shutdown) right after the last handler returned, every success is recorded
    with its output, without any wait after the worker is gone."""
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
    complete_many, complete, soon = store.complete_many, store.complete, store.complete_many_soon

    def counting_many(items: Any) -> set[Any]:
        batched.append(len(items))
        return complete_many(items)

    def counting_soon(items: Any) -> Any:
        batched.append(len(items))
        return soon(items)

    def counting_single(*args: Any, **kwargs: Any) -> bool:
        single.append(args)
        return complete(*args, **kwargs)

    store.complete_many = counting_many  # type: ignore[method-assign]
    store.complete_many_soon = counting_soon  # type: ignore[method-assign]
    store.complete = counting_single  # type: ignore[method-assign]
    ids = outbox.push_many(outbox.engine, [job.s(n) for n in range(60)])
    outbox.app.conf.broker_transport_options = {"polling_interval": 0.02}
    with start_worker(
        outbox.app,
        pool=pool,
        concurrency=4 if pool == "threads" else 1,
        queues=[target],
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=10,
    ) as worker:
        outbox.relay_once()
        wait_until(lambda: len(ran) == 60, 30, what="every handler to run")
        worker.stop()  # a warm shutdown: the pool finishes, then worker_shutdown
    rows = [outbox.get(i) for i in ids]
    assert [(r.status, r.output) for r in rows] == [("completed", n) for n in range(60)]
    assert sum(batched) == 60 and single == []


def _started(outbox: Outbox, job: Any, n: int) -> Any:
    """A command of ``job`` pushed, claimed and started: its Started."""
    command_id = job.push(outbox.engine, n)
    [claimed] = [d for d in outbox.store.claim(10, 60) if d.id == command_id]
    started = outbox.store.start(command_id, claimed.attempt, claimed.name, "w", 60)
    assert started is not None
    return started


def test_successes_survive_a_database_outage_and_a_stale_one_changes_nothing(
    make_outbox: Callable[..., Outbox],
) -> None:
    """A success handed over while the database is away is written when it answers again (the write-back
    retries with backoff); a success of an attempt that no longer holds its command (rescued, or retried
    elsewhere) is fenced out: its row keeps its state and the drop is counted."""
    outbox = make_outbox()

    @outbox.command(target=unique_target("wb"))
    def job(n: int) -> int:
        return n

    done, other = _started(outbox, job, 1), _started(outbox, job, 2)
    stale = type(other)(**{**vars(other), "attempt": other.attempt + 1})
    executor = outbox.executor
    executor.start_write_back()
    write_back = executor.write_back
    assert write_back is not None
    real = outbox.store.complete_many
    failures = iter([StoreUnavailable("outbox database unavailable: connection refused")])

    def away_once(items: Any) -> Any:
        for failure in failures:
            raise failure
        return real(items)

    outbox.store.complete_many = away_once  # type: ignore[method-assign]
    write_back.submit(done, 10)
    write_back.submit(stale, 20)
    assert executor.flush(10)
    assert (outbox.get(done.id).status, outbox.get(done.id).output) == ("completed", 10)
    assert (outbox.get(other.id).status, executor.dropped["fenced"]) == ("running", 1)


def test_successes_within_the_hold_share_one_write_and_flush_does_not_wait_for_it(
    make_outbox: Callable[..., Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Successes handed over within ``WRITE_BACK_HOLD`` of the first go in one ``complete_many`` (one commit);
    a flush (a warm shutdown) writes them at once instead of waiting out the hold; with no flush, a success
    is written once the hold has passed."""
    monkeypatch.setattr(writeback_mod, "WRITE_BACK_HOLD", 30.0)
    outbox = make_outbox()

    @outbox.command(target=unique_target("wb-hold"))
    def job(n: int) -> int:
        return n

    started = [_started(outbox, job, n) for n in range(4)]
    batches: list[int] = []
    real = outbox.store.complete_many

    def counting(items: Any) -> Any:
        batches.append(len(items))
        return real(items)

    outbox.store.complete_many = counting  # type: ignore[method-assign]
    executor = outbox.executor
    executor.start_write_back()
    write_back = executor.write_back
    assert write_back is not None
    for each in started[:3]:
        write_back.submit(each, each.input["n"])
    assert executor.flush(10)  # True within 10 s: it did not wait out the 30 s hold
    assert batches == [3]
    monkeypatch.setattr(writeback_mod, "WRITE_BACK_HOLD", 0.05)
    write_back.submit(started[3], 3)
    wait_until(lambda: outbox.get(started[3].id).status == "completed", 10, what="the held success to be written")
    assert batches == [3, 1]
    assert [outbox.get(s.id).output for s in started] == [0, 1, 2, 3]


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


def test_a_single_handler_process_writes_its_due_successes_on_its_own_thread(
    make_outbox: Callable[..., Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves the prefork and solo form: the successes held past the hold are written by the handler's own thread
    before its next start (so no second thread takes the GIL from it), not before they are due, and the
    write-back's thread still writes them when no handler comes (an idle process)."""
    monkeypatch.setattr(writeback_mod, "WRITE_BACK_HOLD", 0.05)
    monkeypatch.setattr(writeback_mod, "IDLE_HOLDS", 1000)  # the thread would wait 50 s: only write_due writes
    outbox = make_outbox()

    @outbox.command(target=unique_target("wb-own"))
    def job(n: int) -> int:
        return n

    first, second = _started(outbox, job, 1), _started(outbox, job, 2)
    executor = outbox.executor
    executor.start_write_back(one_handler_thread=True)
    write_back = executor.write_back
    assert write_back is not None
    write_back.submit(first, 1)
    write_back.write_due()  # not due yet: nothing written
    assert outbox.get(first.id).status == "running"
    wait_until(lambda: time.monotonic() - write_back._since >= 0.05, 5, what="the hold to pass")
    write_back.write_due()  # sent on this thread, without waiting for the commit
    wait_until(lambda: outbox.get(first.id).status == "completed", 10, what="the success sent by write_due")
    assert outbox.get(first.id).output == 1
    monkeypatch.setattr(writeback_mod, "IDLE_HOLDS", 2)
    write_back.submit(second, 2)
    wait_until(lambda: outbox.get(second.id).status == "completed", 10, what="the idle process's success")


def test_a_sent_batch_whose_answer_is_lost_is_written_again_fenced(
    make_outbox: Callable[..., Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves the promise of a durable outcome for successes sent without waiting (prefork, solo): when the answer
    of a sent batch is lost with its connection, the batch is written again with the same fence, so the row is
    completed with its output, once, and nothing is reported as fenced."""
    monkeypatch.setattr(writeback_mod, "WRITE_BACK_HOLD", 0.0)
    monkeypatch.setattr(writeback_mod, "IDLE_HOLDS", 1000)
    outbox = make_outbox()

    @outbox.command(target=unique_target("wb-lost"))
    def job(n: int) -> int:
        return n

    started = _started(outbox, job, 7)
    store = outbox.store
    real_soon = store.complete_many_soon

    def answer_lost(items: Any) -> Any:
        real_soon(items)()  # the batch did reach the database and commit...

        def lost() -> set[Any]:  # ...but its answer went with the connection
            raise StoreUnavailable("outbox database unavailable: connection lost")

        return lost

    store.complete_many_soon = answer_lost  # type: ignore[method-assign]
    executor = outbox.executor
    executor.start_write_back(one_handler_thread=True)
    write_back = executor.write_back
    assert write_back is not None
    write_back.submit(started, 7)
    write_back.write_due()
    assert executor.flush(10)
    row = outbox.get(started.id)
    assert (row.status, row.output) == ("completed", 7)
    assert executor.dropped["fenced"] == 0
