"""Celery's own tools tell the truth about commands (DESIGN guarantee 8), with a real in-process worker.

Each test reads what a Celery user reads: ``AsyncResult(command_id)`` on the app's result
backend, and Celery's worker signals (``task_success``, ``task_failure``, ``task_retry``,
``task_revoked``: sent right beside the ``task-*`` events Flower shows), by task id.
The Flower end-to-end test (tests/e2e/test_flower.py) checks the same through Flower.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, signals
from celery.exceptions import TaskRevokedError

from orch_outbox import Outbox, current
from orch_outbox.errors import ChainedPush, InvalidOption
from orch_outbox.testing import wait_for_status, wait_until

from .support import new_app, run_worker, unique_target

WAIT = 30.0


class Seen:
    """Celery's worker signals, by kind, as (task id, detail)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self._lock = threading.Lock()

    def add(self, kind: str, task_id: Any, detail: Any = None) -> None:
        with self._lock:
            self.events.append((kind, str(task_id), detail))

    def of(self, task_id: Any) -> list[str]:
        with self._lock:
            return [kind for kind, tid, _ in self.events if tid == str(task_id)]


def relaying(outbox: Outbox, done: Callable[[], bool], what: str) -> None:
    """Relay (as beat would) until ``done``, bounded by WAIT."""

    def check() -> bool:
        outbox.relay_once()
        return done()

    wait_until(check, WAIT, what=what)


@pytest.fixture
def seen() -> Iterator[Seen]:
    record = Seen()
    receivers: list[tuple[Any, Callable[..., None]]] = [
        (signals.task_success, lambda sender=None, **kw: record.add("success", sender.request.id, kw.get("result"))),
        (signals.task_failure, lambda sender=None, **kw: record.add("failure", kw["task_id"], kw["exception"])),
        (signals.task_retry, lambda sender=None, **kw: record.add("retry", kw["request"].id, kw.get("reason"))),
        (signals.task_revoked, lambda sender=None, **kw: record.add("revoked", kw["request"].id, kw.get("expired"))),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, weak=False)
    yield record
    for signal, receiver in receivers:
        signal.disconnect(receiver)


@pytest.fixture
def app() -> Celery:
    app = new_app()
    app.conf.result_backend = "cache+memory://"
    return app


@pytest.fixture
def fid(make_outbox: Callable[..., Outbox], app: Celery) -> Outbox:
    return make_outbox(app=app)


def test_one_task_id_per_command_and_its_output_in_the_result_backend(fid: Outbox, seen: Seen) -> None:
    """Proves: the Celery task id of a command is its command id; AsyncResult(id).get() returns the output
    (SUCCESS) and the worker reported one success under that id."""
    target = unique_target("ok")

    @fid.command(target=target)
    def double(n: int) -> int:
        return 2 * n

    command_id = double.push(fid.engine, 21)
    with run_worker(fid.app, [target]):
        fid.relay_once()
        assert fid.app.AsyncResult(str(command_id)).get(timeout=WAIT) == 42
    assert fid.app.AsyncResult(str(command_id)).state == "SUCCESS"
    assert seen.of(command_id) == ["success"]


def test_a_failed_command_is_failure_with_its_exception(fid: Outbox, seen: Seen) -> None:
    """Proves: a command that raised with no retries left is FAILURE with the handler's own exception and
    traceback; .get() raises it, as for any Celery task; the worker reported a failure, not a success."""
    target = unique_target("fail")

    @fid.command(target=target, retries=0)
    def explode() -> None:
        raise ValueError("boom 42")

    command_id = explode.push(fid.engine)
    with run_worker(fid.app, [target]):
        fid.relay_once()
        result = fid.app.AsyncResult(str(command_id))
        with pytest.raises(ValueError, match="boom 42"):
            result.get(timeout=WAIT)
    assert result.state == "FAILURE" and "boom 42" in (result.traceback or "")
    assert fid.get(command_id).status == "failed"
    assert seen.of(command_id) == ["failure"]


def test_a_flaky_command_is_retry_then_success(fid: Outbox, seen: Seen) -> None:
    """Proves: a failed attempt with a retry left is reported RETRY (Celery's retry), the next attempt
    SUCCESS, under the same task id."""
    target = unique_target("flaky")

    @fid.command(target=target, retries=1)
    def flaky() -> str:
        if current().attempt == 1:
            raise ConnectionError("first try fails")
        return "second try"

    command_id = flaky.push(fid.engine)
    with run_worker(fid.app, [target]):
        relaying(fid, lambda: seen.of(command_id) == ["retry", "success"], "a retry then a success")
        assert fid.app.AsyncResult(str(command_id)).get(timeout=WAIT) == "second try"
    info = fid.get(command_id)
    assert (info.status, info.attempt, info.retries_left) == ("completed", 2, 0)


def test_cancel_is_revoked_in_the_result_backend(fid: Outbox, seen: Seen) -> None:
    """Proves: a running command canceled ends REVOKED (the worker reports task_revoked), and a pending one
    canceled before any worker saw it is REVOKED at once; .get() raises TaskRevokedError for both."""
    target = unique_target("cancel")
    started = threading.Event()

    @fid.command(target=target, timeout=60)
    def long_job() -> None:
        started.set()
        for _ in range(3000):
            threading.Event().wait(0.01)

    running = long_job.push(fid.engine)
    pending = long_job.options(delay=3600).push(fid.engine)
    with run_worker(fid.app, [target], pool="threads", concurrency=2):
        fid.relay_once()
        assert started.wait(WAIT)
        fid.cancel(running)
        wait_for_status(fid, running, "canceled", timeout=WAIT)
        wait_until(lambda: seen.of(running) == ["revoked"], WAIT, what="the worker to report revoked")
    fid.cancel(pending)
    for command_id in (running, pending):
        result = fid.app.AsyncResult(str(command_id))
        assert result.state == "REVOKED"
        with pytest.raises(TaskRevokedError):
            result.get(timeout=1)


def test_celery_revoke_cancels_through_the_outbox(fid: Outbox, seen: Seen) -> None:
    """Proves: Celery's own revoke (``app.control.revoke``, what Flower's Revoke and Terminate send) cancels a
    running command through the outbox - its handler stops, it ends canceled with its if_canceled command
    enqueued - and a pending one is canceled before it runs; a revoke of a final command changes nothing."""
    target = unique_target("revoke")
    started = threading.Event()

    @fid.command(target=target, timeout=60)
    def long_job() -> None:
        started.set()
        for _ in range(3000):
            threading.Event().wait(0.01)

    @fid.command(target=unique_target("cleanup"))
    def cleanup(of: str) -> None: ...

    @long_job.if_canceled
    def _(outcome: Any) -> list[Any]:
        return [cleanup.s(str(outcome.id))]

    running = long_job.push(fid.engine)
    pending = long_job.options(delay=3600).push(fid.engine)
    with run_worker(fid.app, [target], pool="threads", concurrency=2):
        fid.relay_once()
        assert started.wait(WAIT)
        fid.app.control.revoke(str(running), terminate=True)
        fid.app.control.revoke(str(pending))
        wait_for_status(fid, running, "canceled", timeout=WAIT)
        wait_for_status(fid, pending, "canceled", timeout=WAIT)
        wait_until(lambda: "revoked" in seen.of(running), WAIT, what="the worker to report revoked")
    assert [c.name for c in fid.children(running)] == ["cleanup"]
    assert [c.name for c in fid.children(pending)] == ["cleanup"]


def test_a_duplicate_message_reports_nothing(fid: Outbox, seen: Seen) -> None:
    """Proves: a duplicate delivery of an attempt that already ran runs nothing and is reported as no outcome
    at all (no second success under the command's id)."""
    target = unique_target("dup")
    ran: list[int] = []

    @fid.command(target=target)
    def once(n: int) -> int:
        ran.append(n)
        return n

    command_id = once.push(fid.engine, 7)
    with run_worker(fid.app, [target]):
        fid.relay_once()
        wait_for_status(fid, command_id, "completed", timeout=WAIT)
        fid.app.send_task(
            "once",
            kwargs={"n": 7},
            task_id=str(command_id),
            queue=target,
            headers={"outbox": [str(command_id), 1, 60.0]},
        )
        wait_until(lambda: fid.executor.dropped["stale"] >= 1, WAIT, what="the duplicate to be dropped")
    assert ran == [7]
    assert seen.of(command_id) == ["success"]


def test_a_plain_tasks_time_limits_of_the_call_are_its_timeout(fid: Outbox) -> None:
    """Proves: a plain task's signature keeps the time limits Celery would apply to that call: its own
    ``soft_time_limit`` (first) or ``time_limit`` is the run's timeout, before the task's; 0 means none, as in
    Celery (the task's applies); the outbox's ``timeout`` option comes first. A limit that is not a number of
    seconds is refused at push, naming it, nothing written."""

    @fid.app.task(name=unique_target("plain_limited"), soft_time_limit=20, shared=False)
    def limited() -> None: ...

    def timeout(**options: Any) -> float:
        return fid.get(fid.push(fid.engine, limited.s().set(**options))).timeout

    assert timeout() == 20.0
    assert timeout(soft_time_limit=3, time_limit=5) == 3.0
    assert timeout(time_limit=7) == 7.0
    assert timeout(soft_time_limit=0) == 20.0
    assert timeout(soft_time_limit=3, timeout=9) == 9.0
    before = fid.store.unfinished()
    for bad in ({"soft_time_limit": "3"}, {"time_limit": -1}, {"time_limit": True}):
        with pytest.raises(InvalidOption, match=next(iter(bad))):
            fid.push(fid.engine, limited.s().set(**bad))
    assert fid.store.unfinished() == before


def test_plain_task_keeps_its_route_retries_and_time_limits(fid: Outbox, seen: Seen) -> None:
    """Proves: a plain @app.task pushed through the outbox is routed by the app's task_routes, has its own
    max_retries and soft_time_limit as retries and timeout, is retried for an exception in autoretry_for
    (as Celery's autoretry) and fails at once for any other exception (as Celery: no retry)."""
    app = fid.app
    routed = unique_target("routed")
    app.conf.task_routes = {"plain_flaky": {"queue": routed}, "plain_broken": {"queue": routed}}
    calls: list[int] = []

    @app.task(
        name="plain_flaky",
        autoretry_for=(KeyError,),
        max_retries=2,
        default_retry_delay=0,
        soft_time_limit=7,
        shared=False,
    )
    def plain_flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise KeyError("not yet")
        return "done"

    @app.task(name="plain_broken", max_retries=5, shared=False)
    def plain_broken() -> None:
        raise RuntimeError("no retry for me")

    flaky_id = fid.push(fid.engine, plain_flaky.s())
    broken_id = fid.push(fid.engine, plain_broken.s())
    flaky_row, broken_row = fid.get(flaky_id), fid.get(broken_id)
    assert (flaky_row.target, flaky_row.retries, flaky_row.timeout) == (routed, 2, 7.0)
    assert (broken_row.target, broken_row.retries) == (routed, 5)
    fid.adopt_plain_tasks()
    with run_worker(app, [routed]):
        relaying(fid, lambda: fid.store.unfinished() == 0, "both to finish")
    flaky, broken = fid.get(flaky_id), fid.get(broken_id)
    assert (flaky.status, flaky.attempt, flaky.output, len(calls)) == ("completed", 3, "done", 3)
    assert seen.of(flaky_id) == ["retry", "retry", "success"]
    assert (broken.status, broken.attempt, broken.retries_left) == ("failed", 1, 5)
    assert seen.of(broken_id) == ["failure"]


def test_self_retry_in_a_plain_task_goes_through_the_outbox(fid: Outbox, seen: Seen) -> None:
    """Proves: ``self.retry(countdown=0)`` in a bound plain task puts the command back to pending through the
    outbox (attempt 2, one retry used) and sends no Celery message of its own (no stale copy dropped)."""
    app = fid.app
    target = unique_target("selfretry")
    app.conf.task_routes = {"plain_self_retry": {"queue": target}}

    @app.task(name="plain_self_retry", bind=True, max_retries=3, shared=False)
    def plain_self_retry(self: Any) -> int:
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return int(self.request.retries)

    command_id = fid.push(fid.engine, plain_self_retry.s())
    fid.adopt_plain_tasks()
    with run_worker(app, [target]):
        relaying(fid, lambda: fid.get(command_id).is_final, "the retry to finish")
    info = fid.get(command_id)
    assert (info.status, info.attempt, info.retries_left, info.output) == ("completed", 2, 2, 1)
    assert fid.executor.dropped["stale"] == 0
    assert seen.of(command_id) == ["retry", "success"]


def test_a_plain_task_that_ignores_results_stores_none(fid: Outbox) -> None:
    """Proves: ignore_result on a plain task holds through the outbox: the backend never learns its state."""
    app = fid.app
    target = unique_target("ignored")

    @app.task(name="plain_ignored", ignore_result=True, queue=target, shared=False)
    def plain_ignored() -> int:
        return 1

    command_id = fid.push(fid.engine, plain_ignored.s())
    assert fid.get(command_id).target == target  # the task's own queue option routes it
    fid.adopt_plain_tasks()
    with run_worker(app, [target]):
        fid.relay_once()
        wait_for_status(fid, command_id, "completed", timeout=WAIT)
    assert fid.app.AsyncResult(str(command_id)).state == "PENDING"


def test_delay_pushes_through_the_outbox(fid: Outbox) -> None:
    """Proves: ``cmd.delay()`` / ``cmd.apply_async(countdown=...)`` insert the command through the outbox in a
    transaction of their own (durable before any worker runs, routed to its target) and return the
    AsyncResult of the command id; Celery's time limits of the call become its timeout (the outbox's own
    ``timeout`` first); callbacks are refused with a pointer to push."""
    target = unique_target("delay")

    @fid.command(target=target)
    def triple(n: int) -> int:
        return 3 * n

    result = triple.delay(5)
    info = fid.get(result.id)
    assert (info.status, info.target, info.input) == ("pending", target, {"n": 5})
    later = triple.apply_async((1,), countdown=3600, soft_time_limit=4, time_limit=9)
    assert fid.get(later.id).scheduled_at > info.scheduled_at
    assert fid.get(later.id).timeout == 4.0  # Celery's soft time limit of the call (before the hard one)
    assert fid.get(triple.apply_async((1,), time_limit=9).id).timeout == 9.0
    assert fid.get(triple.apply_async((1,), time_limit=9, timeout=2).id).timeout == 2.0
    with pytest.raises(ChainedPush, match=r"outbox\.push"):
        triple.apply_async((1,), link=triple.s())
    with run_worker(fid.app, [target]):
        fid.relay_once()
        assert result.get(timeout=WAIT) == 15


def test_an_expired_command_runs_nothing_at_the_worker(
    make_outbox: Callable[..., Outbox], fake_clock: Any, app: Celery, seen: Seen
) -> None:
    """Proves: a command whose message was published before its expiry and reached a worker after it runs
    nothing and enqueues nothing: the start refuses it, it is recorded expired, Celery reports it revoked
    (expired). A dispatched command whose message no worker takes becomes expired at its expiry (the rescuer),
    not at its dispatch lease."""
    outbox = make_outbox(clock=fake_clock, app=app, dispatch_timeout=600)
    target = unique_target("exp")
    ran: list[int] = []

    @outbox.command(target=target)
    def short_lived(n: int) -> None:
        ran.append(n)

    @outbox.command(target=unique_target("never"))
    def follow_up() -> None: ...

    @short_lived.then
    def _(outcome: Any) -> list[Any]:
        return [follow_up.s()]

    @outbox.command(target=unique_target("nobody"))
    def stranded() -> None: ...

    first = short_lived.options(expires=3).push(outbox.engine, 1)
    second = stranded.options(expires=3).push(outbox.engine)
    assert outbox.relay_once() == 2
    fake_clock.advance(6)
    # The first one's message reaches a worker; no worker consumes the second's queue.
    with run_worker(outbox.app, [target]):
        wait_for_status(outbox, first, "expired", timeout=WAIT)
        wait_until(lambda: "revoked" in seen.of(first), WAIT, what="Celery to report it revoked")
        assert outbox.rescue_once() >= 1
    assert ran == [] and outbox.children(first) == []
    assert outbox.get(second).status == "expired"
    assert outbox.app.AsyncResult(str(second)).state == "REVOKED"


def test_unknown_revoke_ids_go_to_celery(fid: Outbox) -> None:
    """Proves: a revoke of an id that is no command of this outbox is left to Celery's own revoke."""
    assert fid.revoke([str(uuid.uuid4()), "not-a-uuid"]) == (set(), set())
