"""A worker's write-back: attempt starts and plain successes batched by whatever arrives meanwhile.

In a worker (every pool) the starts one process asks for while its previous start is on
its way go together in one transaction (``Store.start_many``), and plain successes (no
chained commands, no batch) are handed to a thread that writes all of them handed over
meanwhile in one transaction (``Store.complete_many``). Both stay fenced; a warm
shutdown writes what is still held.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from celery.contrib.testing.worker import start_worker

from orch_outbox import Outbox
from orch_outbox.errors import StoreUnavailable
from orch_outbox.store import StartRequest
from orch_outbox.testing import wait_until

from .support import unique_target

pytestmark = pytest.mark.pg


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_starts_and_successes_go_through_the_write_back_and_are_flushed_at_shutdown(
    make_outbox: Callable[..., Outbox], pool: str
) -> None:
    """In a threads or solo worker every start goes through ``start_many`` and every plain success through
    ``complete_many`` (written by the write-back thread), none through the one-row ``complete``. When the
    worker is stopped (warm shutdown) right after the last handler returned, every success is recorded with
    its output, without any wait after the worker is gone."""
    outbox = make_outbox()
    target = unique_target("wb")
    ran: list[int] = []
    lock = threading.Lock()

    @outbox.command(target=target, retries=0)
    def job(n: int) -> int:
        with lock:
            ran.append(n)
        return n

    starts: list[int] = []
    batched: list[int] = []
    single: list[Any] = []
    store = outbox.store
    start_many, complete_many, complete = store.start_many, store.complete_many, store.complete

    def counting_starts(requests: Any) -> Any:
        starts.append(len(requests))
        return start_many(requests)

    def counting_many(items: Any) -> set[Any]:
        batched.append(len(items))
        return complete_many(items)

    def counting_single(*args: Any, **kwargs: Any) -> bool:
        single.append(args)
        return complete(*args, **kwargs)

    store.start_many = counting_starts  # type: ignore[method-assign]
    store.complete_many = counting_many  # type: ignore[method-assign]
    store.complete = counting_single  # type: ignore[method-assign]
    ids = outbox.push_many(outbox.engine, [job.s(n) for n in range(60)])
    outbox.app.conf.broker_transport_options = {"polling_interval": 0.02}
    with start_worker(outbox.app, pool=pool, concurrency=4 if pool == "threads" else 1, queues=[target],
                      perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10) as worker:
        outbox.relay_once()
        wait_until(lambda: len(ran) == 60, 30, what="every handler to run")
        worker.stop()  # a warm shutdown: the pool finishes, then worker_shutdown
    rows = [outbox.get(i) for i in ids]
    assert [(r.status, r.output) for r in rows] == [("completed", n) for n in range(60)]
    assert sum(starts) == 60 and sum(batched) == 60 and single == []


def _ready(outbox: Outbox, job: Any, n: int) -> StartRequest:
    """A command of ``job`` pushed and claimed: the start its message asks for."""
    command_id = job.push(outbox.engine, n)
    [claimed] = [d for d in outbox.store.claim(10, 60) if d.id == command_id]
    return StartRequest(command_id, claimed.attempt, claimed.name, "w", 60)


def test_start_many_is_fenced_in_one_transaction(make_outbox: Callable[..., Outbox]) -> None:
    """Guarantee 3 for batched starts: in one ``start_many``, the start of the dispatched attempt runs it; a
    second start of that attempt in the same call (a duplicate message) and a start of an attempt the row
    never had change nothing; each answer comes back in the order asked."""
    outbox = make_outbox()

    @outbox.command(target=unique_target("wb-fence"))
    def job(n: int) -> int:
        return n

    a, b = _ready(outbox, job, 0), _ready(outbox, job, 1)
    stale = StartRequest(b.id, b.attempt + 1, b.name, "w", 60)
    duplicate = StartRequest(a.id, a.attempt, a.name, "w2", 60)
    started = outbox.store.start_many([stale, a, duplicate])
    assert [s is not None for s in started] == [False, True, False]
    assert started[1] is not None and started[1].input == {"n": 0}
    rows = [outbox.get(a.id), outbox.get(b.id)]
    assert [(r.status, r.worker) for r in rows] == [("running", "w"), ("dispatched", None)]


def test_starts_asked_for_meanwhile_go_together_and_a_failing_batch_goes_one_by_one(
    make_outbox: Callable[..., Outbox]
) -> None:
    """While one start is on its way, the starts two other threads ask for wait and then go in ONE
    ``start_many``. When that transaction fails (any database error but a lost connection: here a statement
    timeout), each of its starts goes again on its own and both threads get their attempt."""
    outbox = make_outbox()

    @outbox.command(target=unique_target("wb-batch"))
    def job(n: int) -> int:
        return n

    first, second, third = (_ready(outbox, job, n) for n in range(3))
    executor = outbox.executor
    executor.start_write_back()
    write_back = executor.write_back
    assert write_back is not None
    real, release = outbox.store.start_many, threading.Event()
    calls: list[list[int]] = []

    def gated(requests: Any) -> Any:
        calls.append([r.attempt for r in requests])
        if len(calls) == 1:
            assert release.wait(10)
        if len(requests) > 1:
            raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        return real(requests)

    outbox.store.start_many = gated  # type: ignore[method-assign]
    results: dict[str, Any] = {}

    def start(name: str, request: StartRequest) -> None:
        results[name] = write_back.start(request)

    threads = [threading.Thread(target=start, args=(name, r)) for name, r in (("1", first), ("2", second))]
    threads[0].start()
    wait_until(lambda: len(calls) == 1, 10, what="the first start to be on its way")
    threads[1].start()
    threads.append(threading.Thread(target=start, args=("3", third)))
    threads[2].start()
    wait_until(lambda: len(write_back._starts) == 2, 10, what="two starts waiting")
    release.set()
    for thread in threads:
        thread.join(10)
    assert [len(c) for c in calls[:2]] == [1, 2]
    assert {name: started.input for name, started in results.items()} == {"1": {"n": 0}, "2": {"n": 1}, "3": {"n": 2}}
    assert {outbox.get(r.id).status for r in (first, second, third)} == {"running"}


def test_a_start_that_finds_the_database_away_raises_to_its_caller(make_outbox: Callable[..., Outbox]) -> None:
    """The database is unreachable for a start's round trip: the start raises StoreUnavailable (the executor
    retries it with backoff) and changes nothing; asked again once the database answers, it runs."""
    outbox = make_outbox()

    @outbox.command(target=unique_target("wb-down"))
    def job(n: int) -> int:
        return n

    request = _ready(outbox, job, 2)
    executor = outbox.executor
    executor.start_write_back()
    write_back = executor.write_back
    assert write_back is not None
    real = outbox.store.start_many
    failures = iter([StoreUnavailable("outbox database unavailable: connection refused")])

    def away_once(requests: Any) -> Any:
        for failure in failures:
            raise failure
        return real(requests)

    outbox.store.start_many = away_once  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        write_back.start(request)
    assert outbox.get(request.id).status == "dispatched"
    started = executor._write(lambda: write_back.start(request))
    assert started is not None and started.input == {"n": 2}


def test_successes_survive_a_database_outage_and_a_stale_one_changes_nothing(
    make_outbox: Callable[..., Outbox]
) -> None:
    """A success handed over while the database is away is written when it answers again (the write-back
    retries with backoff); a success of an attempt that no longer holds its command (rescued, or retried
    elsewhere) is fenced out: its row keeps its state and the drop is counted."""
    outbox = make_outbox()

    @outbox.command(target=unique_target("wb"))
    def job(n: int) -> int:
        return n

    requests = [_ready(outbox, job, n) for n in (1, 2)]
    done, other = (outbox.store.start(r.id, r.attempt, r.name, r.worker, r.lease) for r in requests)
    assert done is not None and other is not None
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
