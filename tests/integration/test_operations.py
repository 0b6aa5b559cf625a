"""Operating the outbox on PostgreSQL: pause and resume, cron schedules, dead letters, retention.

Time-dependent tests inject a clock (``FakeClock``) and move it instead of sleeping.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import InvalidOption, Outbox, ScheduleNotFound
from orch_outbox.store import ErrorInfo
from orch_outbox.testing import drain, wait_until

from .support import FakeClock, run_worker, unique_target

WAIT = 30.0


# -- pause and resume -------------------------------------------------------------------------------------


def test_pause_holds_back_a_target_a_tenant_or_everything(make_outbox: Callable[..., Outbox]) -> None:
    """A paused target, tenant, or the global pause: its pending commands are not claimed; other commands
    are; after resume they are claimed again. Pausing twice reports False; resume of nothing reports False."""
    outbox = make_outbox()
    a, b = unique_target("a"), unique_target("b")

    @outbox.command(name="job")
    def job(n: int) -> None: ...

    ids = {
        "a": job.options(target=a).push(outbox.engine, 1),
        "b": job.options(target=b).push(outbox.engine, 2),
        "acme": job.options(target=b, tenant="acme").push(outbox.engine, 3),
    }

    def claimed() -> set[str]:
        """What a claim takes now; the claimed rows are put back for the next look."""
        got = outbox.store.claim(50, 60.0)
        outbox.store.undispatch(got)
        return {k for k, v in ids.items() if v in {d.id for d in got}}

    assert outbox.pause(target=a) is True
    assert outbox.pause(target=a) is False
    assert claimed() == {"b", "acme"}
    assert outbox.pause(tenant="acme") is True
    assert claimed() == {"b"}
    assert outbox.pause() is True
    assert claimed() == set()
    assert {(p["scope"], p["value"]) for p in outbox.paused()} == {("all", ""), ("target", a), ("tenant", "acme")}
    assert outbox.resume() is True and outbox.resume() is False
    assert outbox.resume(target=a) is True
    assert claimed() == {"a", "b"}
    assert outbox.resume(tenant="acme") is True
    assert claimed() == {"a", "b", "acme"}
    with pytest.raises(InvalidOption):
        outbox.pause(target=a, tenant="acme")
    with pytest.raises(InvalidOption):
        outbox.pause(target="bad queue name")


def test_pause_arriving_after_the_claim_still_stops_the_start(make_outbox: Callable[..., Outbox]) -> None:
    """The race: messages were claimed and published, then the target is paused before a worker takes them.
    Once ``pause`` returned, none of them runs: the worker returns each to pending unstarted (no retry used).
    After resume they all run."""
    outbox = make_outbox()
    target = unique_target("race")
    ran: list[int] = []

    @outbox.command(target=target, retries=0)
    def job(n: int) -> None:
        ran.append(n)

    ids = [job.push(outbox.engine, n) for n in range(5)]
    assert outbox.relay_once() == 5  # published while not paused
    outbox.pause(target=target)
    with run_worker(outbox.app, [target]):

        def all_back() -> bool:
            return all(outbox.get(i).status == "pending" for i in ids)

        drain_until(all_back)
        assert ran == []
        assert all(outbox.get(i).retries_left == 0 and outbox.get(i).started_at is None for i in ids)
        outbox.resume(target=target)
        drain(outbox, timeout=WAIT)
    assert sorted(ran) == [0, 1, 2, 3, 4]


def test_running_commands_finish_during_a_pause(make_outbox: Callable[..., Outbox]) -> None:
    """A command already running when its target is paused completes normally."""
    outbox = make_outbox()
    target = unique_target("run")
    release = threading.Event()
    entered = threading.Event()

    @outbox.command(target=target, retries=0)
    def slow() -> str:
        entered.set()
        release.wait(10)
        return "done"

    command_id = slow.push(outbox.engine)
    with run_worker(outbox.app, [target]):
        outbox.relay_once()
        assert entered.wait(10)
        outbox.pause(target=target)
        release.set()
        drain_until(lambda: outbox.get(command_id).status == "completed")
    assert outbox.get(command_id).output == "done"


def drain_until(predicate: Callable[[], Any], timeout: float = WAIT) -> None:
    """Wait (bounded) until ``predicate`` holds."""
    wait_until(predicate, timeout, what="the expected state")


# -- cron schedules --------------------------------------------------------------------------------------


@pytest.fixture
def scheduled(make_outbox: Callable[..., Outbox], fake_clock: FakeClock) -> tuple[Outbox, Any, FakeClock]:
    outbox = make_outbox(clock=fake_clock)

    @outbox.command(target=unique_target("cron"))
    def report(kind: str) -> None: ...

    fake_clock.set(dt.datetime(2027, 1, 4, 8, 59, 30, tzinfo=dt.UTC))  # a Monday
    return outbox, report, fake_clock


def commands_of(outbox: Outbox) -> list[Any]:
    return sorted(outbox.find(limit=1000), key=lambda c: c.created_at)


def test_schedule_ticks_become_commands_once(scheduled: tuple[Outbox, Any, FakeClock]) -> None:
    """put_schedule("0 9 * * mon-fri", Europe/Paris): nothing before the tick; at the tick one command with the
    schedule's input; ticking again at the same time adds nothing; the next run is the next weekday 09:00 Paris."""
    outbox, report, clock = scheduled
    info = outbox.put_schedule("daily", report.s("sales"), "0 9 * * mon-fri", timezone="Europe/Paris")
    assert info.next_run_at == dt.datetime(2027, 1, 5, 8, 0, tzinfo=dt.UTC)  # 09:00 Paris = 08:00 UTC in winter
    clock.set(dt.datetime(2027, 1, 5, 7, 59, 59, tzinfo=dt.UTC))
    assert outbox.tick_schedules() == []
    clock.set(dt.datetime(2027, 1, 5, 8, 0, 1, tzinfo=dt.UTC))
    (tick,) = outbox.tick_schedules()
    assert outbox.tick_schedules() == []
    (command,) = commands_of(outbox)
    assert (command.id, command.name, command.input) == (tick["command_id"], "report", {"kind": "sales"})
    assert outbox.schedule("daily").next_run_at == dt.datetime(2027, 1, 6, 8, 0, tzinfo=dt.UTC)


def test_two_beats_on_one_tick_make_one_command(scheduled: tuple[Outbox, Any, FakeClock]) -> None:
    """The race: eight threads (eight beats) tick the same due schedule at once, twenty ticks over; each tick
    makes exactly one command (the schedule row is locked with SKIP LOCKED and moved on in the same
    transaction)."""
    outbox, report, clock = scheduled
    outbox.put_schedule("often", report.s("x"), "* * * * *")
    for minute in range(20):
        clock.set(dt.datetime(2027, 1, 4, 10, minute, 0, 500, tzinfo=dt.UTC))
        barrier = threading.Barrier(8)

        def beat(barrier: threading.Barrier) -> None:
            barrier.wait(5)
            outbox.tick_schedules()

        threads = [threading.Thread(target=beat, args=(barrier,)) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        assert len(commands_of(outbox)) == minute + 1


def test_catch_up_after_downtime_is_one_command(scheduled: tuple[Outbox, Any, FakeClock]) -> None:
    """After three hours without a beat, an hourly schedule makes ONE command for the missed ticks and goes on
    from the next tick after now (the documented catch-up policy)."""
    outbox, report, clock = scheduled
    outbox.put_schedule("hourly", report.s("h"), "0 * * * *")
    clock.set(dt.datetime(2027, 1, 4, 12, 30, tzinfo=dt.UTC))
    assert len(outbox.tick_schedules()) == 1
    assert len(commands_of(outbox)) == 1
    assert outbox.schedule("hourly").next_run_at == dt.datetime(2027, 1, 4, 13, 0, tzinfo=dt.UTC)


def test_unique_schedule_skips_while_the_previous_run_is_unfinished(scheduled: tuple[Outbox, Any, FakeClock]) -> None:
    """unique=True: a tick whose previous command is still pending is skipped (counted); once that command is
    final, the next tick makes a command again."""
    outbox, report, clock = scheduled
    outbox.put_schedule("one-at-a-time", report.s("u"), "* * * * *", unique=True)
    clock.set(dt.datetime(2027, 1, 4, 9, 0, 1, tzinfo=dt.UTC))
    (first,) = outbox.tick_schedules()
    clock.set(dt.datetime(2027, 1, 4, 9, 1, 1, tzinfo=dt.UTC))
    (skipped,) = outbox.tick_schedules()
    assert skipped["command_id"] is None and skipped["skipped"] == "pending"
    assert outbox.schedule("one-at-a-time").skipped == 1
    outbox.cancel(first["command_id"])
    clock.set(dt.datetime(2027, 1, 4, 9, 2, 1, tzinfo=dt.UTC))
    (again,) = outbox.tick_schedules()
    assert again["command_id"] is not None
    assert len(commands_of(outbox)) == 2


def test_schedule_update_disable_delete(scheduled: tuple[Outbox, Any, FakeClock]) -> None:
    """put_schedule again replaces the cron and input (keeping the history); a disabled schedule makes nothing;
    enabling counts from now; delete removes it; bad cron, zone or name raise InvalidOption and write nothing."""
    outbox, report, clock = scheduled
    outbox.put_schedule("s", report.s("a"), "0 * * * *")
    updated = outbox.put_schedule("s", report.s("b"), "30 * * * *", enabled=False)
    assert (updated.cron, updated.input, updated.enabled) == ("30 * * * *", {"kind": "b"}, False)
    clock.set(dt.datetime(2027, 1, 4, 11, 0, tzinfo=dt.UTC))
    assert outbox.tick_schedules() == []
    enabled = outbox.enable_schedule("s")
    assert enabled.next_run_at == dt.datetime(2027, 1, 4, 11, 30, tzinfo=dt.UTC)
    for bad in [dict(cron="61 * * * *"), dict(cron="* * *"), dict(cron="0 * * * *", timezone="Mars/Olympus")]:
        with pytest.raises(InvalidOption):
            outbox.put_schedule("bad", report.s("x"), **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidOption):
        outbox.put_schedule("", report.s("x"), "0 * * * *")
    assert [s.name for s in outbox.schedules()] == ["s"]
    assert outbox.delete_schedule("s") is True and outbox.delete_schedule("s") is False
    with pytest.raises(ScheduleNotFound):
        outbox.schedule("s")


def test_beat_entries_run_the_schedules_and_cleanup(make_outbox: Callable[..., Outbox]) -> None:
    """The outbox adds its schedule and clean-up services to beat's schedule, at their interval settings."""
    outbox = make_outbox(schedule_interval=2.0, cleanup_interval=60.0)
    outbox._add_beat_entries()
    entries = outbox.app.conf.beat_schedule
    assert entries["orch-outbox-schedules"] == {"task": "orch_outbox.schedules", "schedule": 2.0}
    assert entries["orch-outbox-cleanup"] == {"task": "orch_outbox.cleanup", "schedule": 60.0}


# -- dead letters and retention --------------------------------------------------------------------------


def test_failed_commands_can_be_listed_requeued_and_purged(make_outbox: Callable[..., Outbox]) -> None:
    """failed() lists dead letters with their errors; requeue(id) gives fresh retries and the command runs
    again; requeue with no argument is refused; purge deletes only failed rows of the filter."""
    outbox = make_outbox()
    target = unique_target("dl")
    healthy = threading.Event()

    @outbox.command(target=target, retries=1)
    def fragile(n: int) -> int:
        if not healthy.is_set():
            raise ConnectionError(f"down {n}")
        return n

    ids = [fragile.push(outbox.engine, n) for n in range(3)]
    with run_worker(outbox.app, [target]):
        drain(outbox, timeout=WAIT)
        dead = outbox.failed()
        assert sorted(c.id for c in dead) == sorted(ids)
        assert all(c.error and c.error.type == "ConnectionError" and c.retries_left == 0 for c in dead)
        with pytest.raises(InvalidOption):
            outbox.requeue()
        healthy.set()
        assert outbox.requeue([ids[0]]) == 1
        assert outbox.get(ids[0]).retries_left == 1
        drain(outbox, timeout=WAIT)
    again = outbox.get(ids[0])
    assert (again.status, again.output, again.error) == ("completed", 0, None)
    assert outbox.purge(name="fragile") == 2
    assert [c.id for c in outbox.find(limit=10)] == [ids[0]]


def test_retention_deletes_old_final_rows_in_batches(make_outbox: Callable[..., Outbox], fake_clock: FakeClock) -> None:
    """cleanup_once deletes final rows older than their retention (completed and failed have their own) in
    statements of ``cleanup_batch`` rows, and keeps unfinished rows, recent rows, and members of open
    batches."""
    outbox = make_outbox(clock=fake_clock, retention=3600.0, failed_retention=7200.0, cleanup_batch=7)

    @outbox.command(target=unique_target("ret"))
    def job(n: int) -> None: ...

    @outbox.command(target=unique_target("ret"))
    def after(outcomes: list[Any]) -> None: ...

    done = [job.push(outbox.engine, n) for n in range(20)]
    failed = [job.push(outbox.engine, n) for n in range(5)]
    waiting = job.push(outbox.engine, 99)
    ref = outbox.push_batch(outbox.engine, [job.s(1), job.s(2)], then=after.s())
    t = outbox.store.table
    with outbox.engine.begin() as conn:
        old = fake_clock() - dt.timedelta(hours=1, minutes=30)
        finished = done + ref.member_ids[:1]
        conn.execute(sa.update(t).where(t.c.id.in_(finished)).values(status="completed", finished_at=old))
        conn.execute(sa.update(t).where(t.c.id.in_(failed)).values(status="failed", finished_at=old))
    assert outbox.cleanup_once() == 20
    remaining = {c.id for c in outbox.find(limit=100)}
    assert remaining == {*failed, waiting, *ref.member_ids}
    fake_clock.advance(3600)
    assert outbox.cleanup_once() == 5


def test_settings_for_the_new_services_are_validated(make_outbox: Callable[..., Outbox]) -> None:
    """Bad values for the workflow settings are refused with the key named."""
    from orch_outbox import ConfigurationError

    for bad in [dict(retention=-1), dict(cleanup_batch=0), dict(schedule_interval=0), dict(error_hook="not a path")]:
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            make_outbox(**bad)


def test_purge_keeps_failed_members_of_an_open_batch(make_outbox: Callable[..., Outbox]) -> None:
    """purge(all=True) leaves a failed member of a batch that is still open (its continuation will list it);
    once the batch finished, the member can be purged."""
    outbox = make_outbox()

    @outbox.command(target=unique_target("pg"), retries=0)
    def job(n: int) -> None: ...

    @outbox.command(target=unique_target("pg"))
    def after(outcomes: list[Any]) -> None: ...

    ref = outbox.push_batch(outbox.engine, [job.s(1), job.s(2)], then=after.s())

    started = [outbox.store.start(d.id, d.attempt, d.name, "w", 60) for d in outbox.store.claim(10, 60.0)]
    first, second = sorted(started, key=lambda s: s.input["n"] if s else 0)
    assert first is not None and second is not None
    outbox.store.fail(first.id, first.attempt, "failure", ErrorInfo("E", "x"), [])
    assert outbox.purge(all=True) == 0
    outbox.store.complete(second.id, second.attempt, None, [])
    continuation = outbox.get(ref.continuation_id)  # type: ignore[arg-type]
    assert [o["status"] for o in continuation.input["outcomes"]] == ["failed", "completed"]
    assert outbox.purge(all=True) == 1
