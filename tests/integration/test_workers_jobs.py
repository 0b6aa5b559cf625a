"""The worker registry, the reaper and long-running jobs: on SQLite and PostgreSQL, with injected clocks.

The registry renewals, the reaper's passes and the job runner's beats are driven by hand
here (no threads of their own), so each step is deterministic; the job handlers run in
the runner's threads and the tests wait on their states, bounded.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orch_outbox import InvalidOption, JobNotFound, Outbox, UnknownCommand, current
from orch_outbox.jobs import JobRunner
from orch_outbox.reaper import Reaper
from orch_outbox.testing import wait_until
from orch_outbox.workers import Identity, Presence

from .support import FakeClock, new_app, unique_target

TIMEOUT = 10.0


class Mono:
    """A monotonic clock for the reaper that moves with the store's fake clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "pg"])
def timed(
    request: pytest.FixtureRequest, make_outbox: Callable[..., Outbox], fake_clock: FakeClock, tmp_path: Path
) -> Iterator[Outbox]:
    """An outbox whose store reads ``fake_clock``, on each database (worker timeout 10 s, heartbeat 2 s)."""
    settings: dict[str, Any] = {
        "worker_timeout": TIMEOUT,
        "worker_heartbeat": 2.0,
        "rescue_interval": 1.0,
        "retry_backoff": "fixed",
        "retry_backoff_base": 5.0,
        "job_retries": 5,
    }
    if request.param == "pg":
        yield make_outbox(clock=fake_clock, **settings)
        return
    outbox = Outbox(new_app(), f"sqlite:///{tmp_path}/jobs.sqlite3", clock=fake_clock, lock_buffer=2.0, **settings)
    outbox.create_tables()
    yield outbox
    outbox.close()
    outbox.engine.dispose()


def _presence(outbox: Outbox, node: str, queues: list[str], max_jobs: int = 3, **kw: Any) -> Presence:
    return Presence(outbox.store, outbox.settings, Identity.of(node, "threads", 4, queues, max_jobs), **kw)


def _beacon(outbox: Outbox, target: str, seen: list[str] | None = None) -> Any:
    """A job handler that loops until asked to stop; records how it ended in ``seen``."""

    @outbox.command(target=target)
    def beacon(name: str, argument: Any = None) -> str:
        stop = threading.Event()
        while not current().canceled:
            stop.wait(0.02)
        if seen is not None:
            seen.append(name)
        return name

    return beacon


def _runner(outbox: Outbox, node: str, target: str, capacity: int) -> JobRunner:
    return JobRunner(
        outbox.store,
        outbox.settings,
        outbox.settler,
        outbox.chained_rows,
        outbox.app.tasks.get,
        node,
        [target],
        capacity,
    )


def test_a_worker_registers_renews_and_leaves(timed: Outbox, fake_clock: FakeClock) -> None:
    """Proves the registry row: written at the first renewal with the worker's identity, its last_seen moved by
    each renewal, listed with paging and a total, and gone after a warm shutdown."""
    target = unique_target("reg")
    first = _presence(timed, "w1@host", [target], max_jobs=3)
    second = _presence(timed, "w2@host", [target])
    assert first.beat_once() and second.beat_once()
    seen = timed.worker("w1@host").last_seen_at
    fake_clock.advance(1.5)
    assert first.beat_once()
    worker = timed.worker("w1@host")
    assert worker.last_seen_at > seen
    assert (worker.queues, worker.max_jobs, worker.pool, worker.concurrency) == ([target], 3, "threads", 4)
    page = timed.workers(limit=1)
    assert (page.total, [w.name for w in page]) == (2, ["w1@host"])
    assert [w.name for w in timed.workers(limit=1, offset=1)] == ["w2@host"]
    first.leave()
    assert [w.name for w in timed.workers()] == ["w2@host"]


def test_the_reaper_returns_what_a_dead_worker_ran_at_once(timed: Outbox, fake_clock: FakeClock) -> None:
    """Proves fast reallocation: a worker whose row stopped renewing for the worker timeout has its running command
    retried (a lost attempt, one retry used) and its job handed back (no retry used) long before their own leases
    lapse, and its row is removed; a live worker beside it keeps what it runs. Also proves the reaper judges only
    what it watched: right after it starts, and after a pause of its own, it waits a full timeout first."""
    target = unique_target("reap")
    beacon = _beacon(timed, target)

    @timed.command(target=target, timeout=3600, retries=2)
    def long_running() -> None: ...

    mono = Mono()
    reaper = Reaper(timed.store, timed.settler, timed.settings, monotonic=mono)
    dead, alive = _presence(timed, "dead@host", [target]), _presence(timed, "alive@host", [target])
    assert dead.beat_once() and alive.beat_once()
    doomed = long_running.push(timed.engine)
    kept = long_running.push(timed.engine)
    claimed = {d.id: d for d in timed.store.claim(10, 30)}
    assert timed.store.start(doomed, claimed[doomed].attempt, "long_running", "dead@host", 3600) is not None
    assert timed.store.start(kept, claimed[kept].attempt, "long_running", "alive@host", 3600) is not None
    job = timed.jobs.start("feed", 1, command=beacon, target=target)
    (started,) = timed.store.claim_jobs("dead@host", [target], 5, 30.0)
    assert started.id == job

    def step(seconds: float) -> int:
        fake_clock.advance(seconds)
        mono.now += seconds
        alive.beat_once()
        return reaper.run_once()

    assert step(0) == 0  # the reaper's first pass only starts watching
    assert step(TIMEOUT + 1) == 0  # a pause of the reaper itself: it watches again before judging anyone
    returned = [step(1.0) for _ in range(int(TIMEOUT) + 1)]
    assert sum(returned) == 2 and returned[-1] == 0
    lost = timed.get(doomed)
    assert (lost.status, lost.outcome, lost.retries_left) == ("pending", "lost", 1)
    assert lost.error is not None and "dead@host" in lost.error.message
    back = timed.get(job)
    assert (back.status, back.outcome, back.retries_left) == ("pending", "lost", 5)
    assert timed.get(kept).status == "running"
    assert [w.name for w in timed.workers()] == ["alive@host"]


def test_two_reapers_return_each_attempt_once(timed: Outbox, fake_clock: FakeClock) -> None:
    """Proves several beats may reap at once: two reapers that both judge a worker dead settle each of its
    attempts once (one retry used, not two) and the job once."""
    target = unique_target("two")
    beacon = _beacon(timed, target)

    @timed.command(target=target, timeout=3600, retries=3)
    def long_running() -> None: ...

    monos = [Mono(), Mono()]
    reapers = [Reaper(timed.store, timed.settler, timed.settings, monotonic=m) for m in monos]
    dead = _presence(timed, "dead@host", [target])
    assert dead.beat_once()
    commands = [long_running.push(timed.engine) for _ in range(3)]
    for d in timed.store.claim(10, 30):
        assert timed.store.start(d.id, d.attempt, d.name, "dead@host", 3600) is not None
    job = timed.jobs.start("feed", command=beacon, target=target)
    assert timed.store.claim_jobs("dead@host", [target], 1, 3600.0)
    for r in reapers:
        assert r.run_once() == 0  # both start watching
    for step in range(int(TIMEOUT) + 1):
        fake_clock.advance(1.0)
        for m in monos:
            m.now += 1.0
        if step < TIMEOUT:
            assert [r.run_once() for r in reapers] == [0, 0]  # watching, not a full timeout yet
    # Both judged the worker dead and read what it held; the first returns it, the second's writes are fenced.
    held = timed.store.held_by("dead@host")
    assert len(held) == 4
    assert reapers[0].run_once() == 4
    assert reapers[1]._settle_all("dead@host", held) == 0
    assert reapers[1].run_once() == 0
    assert [(c.status, c.retries_left) for c in map(timed.get, commands)] == [("pending", 2)] * 3
    assert (timed.get(job).status, timed.get(job).retries_left, timed.get(job).attempt) == ("pending", 5, 1)


def test_a_restart_under_the_same_nodename_returns_the_earlier_run_at_once(
    timed: Outbox, fake_clock: FakeClock
) -> None:
    """Proves a worker restarted under its nodename (the usual restart) does not inherit its earlier run's
    attempts: registering replaces the row and hands back, at once, the jobs the earlier run still held."""
    target = unique_target("restart")
    beacon = _beacon(timed, target)
    before = _presence(timed, "w1@host", [target])
    assert before.beat_once()
    job = timed.jobs.start("feed", None, command=beacon, target=target)
    assert timed.store.claim_jobs("w1@host", [target], 1, 30.0)
    fake_clock.advance(1)
    after = _presence(timed, "w1@host", [target], replaced=timed.reaper.returned_by_restart)
    assert after.beat_once()
    back = timed.get(job)
    assert (back.status, back.outcome, back.retries_left) == ("pending", "lost", 5)
    assert timed.worker("w1@host").incarnation == after.identity.incarnation


def test_jobs_start_once_per_name_and_are_listed_with_totals(timed: Outbox) -> None:
    """Proves the manager API: a name is unique among unfinished jobs (starting it again, even with another
    argument, returns the same job), get by name or id, list by status with paging and a total; bad input
    (a blank name, no handler, an unknown status) is refused with a clear error and writes nothing."""
    target = unique_target("api")
    beacon = _beacon(timed, target)
    first = timed.jobs.start("feed-1", {"url": "a"}, command=beacon, target=target)
    assert timed.jobs.start("feed-1", {"url": "b"}, command=beacon, target=target) == first
    second = timed.jobs.start("feed-2", None, command="beacon", target=target)
    info = timed.jobs.get("feed-1")
    assert (info.id, info.name, info.command, info.argument) == (first, "feed-1", "beacon", {"url": "a"})
    assert info.status == "pending"
    assert timed.jobs.get(str(second)).name == "feed-2"
    page = timed.jobs.list(status="pending", limit=1)
    assert (page.total, len(page)) == (2, 1)
    assert timed.jobs.list(limit=None).total == 2
    with pytest.raises(JobNotFound):
        timed.jobs.get("feed-3")
    with pytest.raises(InvalidOption):
        timed.jobs.start(" ", command=beacon)
    with pytest.raises(UnknownCommand):
        timed.jobs.start("feed-4")
    with pytest.raises(InvalidOption):
        timed.jobs.list(status="sleeping")
    assert timed.jobs.list(limit=None).total == 2


def test_a_runner_holds_no_more_than_its_room_and_stop_reaches_the_job(timed: Outbox) -> None:
    """Proves capacity and stop: a runner with room for 2 starts 2 of 3 jobs (the third waits pending); a stop
    reaches the running job within a lease renewal (the handler sees ``current().canceled``) and records it
    canceled with its if_canceled commands; the freed room takes the waiting job at the next beat; at warm
    shutdown the jobs still running are handed back to pending without using a retry."""
    target = unique_target("room")
    seen: list[str] = []
    beacon = _beacon(timed, target, seen)

    @timed.command(target=target)
    def on_stopped(name: str) -> None: ...

    @beacon.if_canceled
    def _(outcome: Any) -> list[Any]:
        return [on_stopped.s(outcome.input["name"])]

    ids = [timed.jobs.start(f"job-{i}", i, command=beacon, target=target) for i in range(3)]
    runner = _runner(timed, "w1@host", target, capacity=2)
    try:
        runner.beat(True, 0.0)
        assert runner.holding() == 2
        statuses = sorted(timed.jobs.get(i).status for i in ids)
        assert statuses == ["pending", "running", "running"]
        running = [i for i in ids if timed.jobs.get(i).status == "running"]
        assert timed.jobs.stop(running[0])
        wait_until(lambda: timed.jobs.get(running[0]).status == "canceled", 10, what="the stop to reach the job")
        assert seen == [timed.jobs.get(running[0]).name]
        assert [c.name for c in timed.children(running[0])] == ["on_stopped"]
        wait_until(lambda: runner.holding() == 1, 5, what="the stopped job's room to free")
        runner.beat(True, 0.0)
        assert sorted(timed.jobs.get(i).status for i in ids) == ["canceled", "running", "running"]
        assert max(len(timed.jobs.list(worker="w1@host", status="running").items), runner.holding()) == 2
    finally:
        runner.leave(10.0)
    handed = [timed.jobs.get(i) for i in ids if i != running[0]]
    assert [(j.status, j.outcome) for j in handed] == [("pending", "lost")] * 2
    assert all(timed.get(j.id).retries_left == 5 for j in handed)


def test_a_job_that_raises_restarts_with_backoff(timed: Outbox, fake_clock: FakeClock) -> None:
    """Proves a crashing job is restarted, after its backoff, using one of its own retries (outbox_job_retries),
    while a job handed back (its worker left) uses none."""
    target = unique_target("crash")
    attempts: list[int] = []

    @timed.command(target=target)
    def flaky(name: str, argument: Any = None) -> None:
        attempts.append(current().attempt)
        if current().attempt == 1:
            raise RuntimeError("boom")
        while not current().canceled:
            threading.Event().wait(0.02)

    job = timed.jobs.start("flaky", command=flaky, target=target)
    runner = _runner(timed, "w1@host", target, capacity=1)
    try:
        runner.beat(True, 0.0)
        wait_until(lambda: timed.jobs.get(job).status == "pending", 10, what="the crash to be recorded")
        crashed = timed.get(job)
        assert (crashed.outcome, crashed.retries_left) == ("failure", 4)
        assert crashed.error is not None and "boom" in crashed.error.message
        wait_until(lambda: runner.holding() == 0, 5, what="the crashed job's room to free")
        runner.beat(True, 0.0)
        assert timed.jobs.get(job).status == "pending"  # not due before its backoff
        fake_clock.advance(6)
        runner.beat(True, 0.0)
        wait_until(lambda: attempts == [1, 2], 10, what="the restart")
    finally:
        runner.leave(10.0)
    assert (timed.get(job).status, timed.get(job).retries_left) == ("pending", 4)


def test_a_cut_off_worker_stops_its_jobs_before_it_may_be_reaped(timed: Outbox) -> None:
    """Proves a worker cut off from the database for half the worker timeout stops its jobs (before the reaper
    could hand them to another worker) and hands them back once the database answers."""
    target = unique_target("cut")
    seen: list[str] = []
    beacon = _beacon(timed, target, seen)
    job = timed.jobs.start("feed", command=beacon, target=target)
    runner = _runner(timed, "w1@host", target, capacity=1)
    try:
        runner.beat(True, 0.0)
        assert timed.jobs.get(job).status == "running"
        runner.beat(False, TIMEOUT / 2 - 1)
        assert runner.running()  # still running: not cut off long enough
        runner.beat(False, TIMEOUT / 2 + 0.1)
        wait_until(lambda: seen == ["feed"], 10, what="the job to see it must stop")
        assert timed.jobs.get(job).status == "running"  # nothing written while cut off
        runner.beat(True, 0.0)  # back: the job is handed back, and taken again at once (the room is free)
        back = timed.get(job)
        assert (back.status, back.attempt, back.outcome, back.retries_left) == ("running", 2, "lost", 5)
    finally:
        runner.leave(5.0)


def test_each_claim_of_jobs_takes_its_own_targets_limit_worker_and_lease(timed: Outbox, fake_clock: FakeClock) -> None:
    """Proves the claim of due jobs, one statement built once per store, applies each call's own arguments: a
    claim for one target takes none of another's, a limit of one takes one, and each claimed job is held by the
    caller for the caller's lease."""
    first, second = unique_target("claim-a"), unique_target("claim-b")
    beacon = _beacon(timed, first)
    firsts = {timed.jobs.start(f"a{i}", command=beacon, target=first) for i in range(2)}
    only_second = timed.jobs.start("b", command=beacon, target=second)
    now = fake_clock()
    assert [s.id for s in timed.store.claim_jobs("w1@host", [second], 5, 30.0)] == [only_second]
    (one,) = timed.store.claim_jobs("w2@host", [first, second], 1, 60.0)
    (other,) = timed.store.claim_jobs("w3@host", [first], 5, 90.0)
    assert {one.id, other.id} == firsts
    assert timed.store.claim_jobs("w3@host", [first, second], 5, 30.0) == []
    for job, worker, lease in ((only_second, "w1@host", 30), (one.id, "w2@host", 60), (other.id, "w3@host", 90)):
        held = timed.get(job)
        assert (held.status, held.worker, held.attempt) == ("running", worker, 1)
        assert held.lease_expires_at == now + dt.timedelta(seconds=lease)  # the store reads the injected clock
