"""Workflows on PostgreSQL with an in-process worker: chains, groups, chords, batches, plain tasks, expiry.

Each test pushes through the public API in a committed transaction, lets a real Celery
worker (solo pool, in-memory broker) run the commands, and checks the rows it leaves.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from celery import chain, chord, group
from sqlalchemy.orm import Session

from orch_outbox import BatchClosed, Outbox
from orch_outbox.request import AttemptDropped
from orch_outbox.signals import command_failed
from orch_outbox.testing import drain

from .support import FakeClock, run_worker, unique_target

WAIT = 30.0


@pytest.fixture
def flow(make_outbox: Callable[..., Outbox]) -> tuple[Outbox, str, dict[str, Any]]:
    """An outbox with a few commands and a plain Celery task on one target; ``seen`` records calls."""
    outbox = make_outbox(retry_backoff_base=0.0)
    target = unique_target("flow")
    seen: dict[str, Any] = {"report": [], "total": [], "plain": [], "fail": 0}

    @outbox.command(target=target, retries=0)
    def add(x: int, y: int = 0) -> int:
        return x + y

    @outbox.command(target=target, retries=0)
    def double(n: int) -> int:
        return n * 2

    @outbox.command(target=target, retries=0)
    def boom(n: int) -> int:
        raise ValueError(f"boom {n}")

    @outbox.command(target=target, retries=0)
    def total(values: list[int], label: str = "") -> str:
        seen["total"].append(values)
        return f"{label}{sum(values)}"

    @outbox.command(target=target, retries=0)
    def report(outcomes: list[dict[str, Any]]) -> int:
        seen["report"].append(outcomes)
        return len(outcomes)

    @outbox.app.task(name=f"plain_mul_{uuid.uuid4().hex[:6]}", shared=False, queue=target)
    def plain_mul(n: int, by: int = 3) -> int:
        seen["plain"].append(n)
        return n * by

    seen["tasks"] = {"add": add, "double": double, "boom": boom, "total": total, "report": report, "mul": plain_mul}
    return outbox, target, seen


def test_chain_passes_each_output_to_the_next_step(flow: tuple[Outbox, str, dict[str, Any]]) -> None:
    """chain(add(2, 3), double(), plain_mul(by=10), add.si(1, 1)): each step gets the previous output as its
    first argument (an immutable .si() step gets none); each step is a row chained from the previous one; a
    plain Celery task in the chain runs fenced like a command."""
    outbox, target, seen = flow
    t = seen["tasks"]
    with Session(outbox.engine) as session, session.begin():
        first = outbox.push(session, chain(t["add"].s(2, 3), t["double"].s(), t["mul"].s(by=10), t["add"].si(1, 1)))
    assert len(outbox.get(first).chain or []) == 3  # the rest of the chain waits on the first row
    with run_worker(outbox.app, [target]):
        drain(outbox, timeout=WAIT)
    steps = [outbox.get(first)]
    while children := outbox.children(steps[-1].id):
        assert len(children) == 1
        steps.append(children[0])
    assert [s.name for s in steps] == ["add", "double", t["mul"].name, "add"]
    assert [s.output for s in steps] == [5, 10, 100, 2]
    assert all(s.status == "completed" for s in steps)
    assert seen["plain"] == [10]


def test_a_failing_step_ends_its_chain(flow: tuple[Outbox, str, dict[str, Any]]) -> None:
    """A chain step that fails ends the chain there (as in Celery): the steps after it never exist."""
    outbox, target, seen = flow
    t = seen["tasks"]
    first = outbox.push(outbox.engine, chain(t["add"].s(1), t["boom"].s(), t["double"].s()))
    with run_worker(outbox.app, [target]):
        drain(outbox, timeout=WAIT)
    (failed,) = outbox.children(first)
    assert (failed.name, failed.status, outbox.children(failed.id)) == ("boom", "failed", [])


def test_chord_body_gets_the_members_outputs_in_order(flow: tuple[Outbox, str, dict[str, Any]]) -> None:
    """chord([double(1..5)], total(label=...)): the body runs once, after every member, with the list of
    outputs in header order; the batch is finished and its continuation has the id announced at push."""
    outbox, target, seen = flow
    t = seen["tasks"]
    batch_id = outbox.push(outbox.engine, chord([t["double"].s(i) for i in range(1, 6)], t["total"].s(label="sum=")))
    with run_worker(outbox.app, [target]):
        drain(outbox, timeout=WAIT)
    info = outbox.batch(batch_id)
    assert (info.kind, info.status, info.counts, info.progress) == ("chord", "finished", {"completed": 5}, 1.0)
    body = outbox.get(info.continuation_id)  # type: ignore[arg-type]
    assert (body.status, body.output) == ("completed", "sum=30")
    assert seen["total"] == [[2, 4, 6, 8, 10]]


def test_chord_with_a_failed_member_does_not_call_its_body(flow: tuple[Outbox, str, dict[str, Any]]) -> None:
    """A chord member that fails for good: the body is recorded failed (ChordError) and never runs."""
    outbox, target, seen = flow
    t = seen["tasks"]
    batch_id = outbox.push(outbox.engine, chord([t["double"].s(1), t["boom"].s(2)], t["total"].s()))
    with run_worker(outbox.app, [target]):
        drain(outbox, timeout=WAIT)
    body = outbox.get(outbox.batch(batch_id).continuation_id)  # type: ignore[arg-type]
    assert (body.status, body.error.type if body.error else None) == ("failed", "ChordError")
    assert seen["total"] == []


def test_chord_whose_members_are_retried_calls_its_body_once(make_outbox: Callable[..., Outbox]) -> None:
    """The race of retries: every chord member fails its first two attempts and succeeds on the third. The body
    waits for the retried members (a retry is not final), runs exactly once, and gets every member's output."""
    outbox = make_outbox(retry_backoff_base=0.0)
    target = unique_target("retry")
    attempts: dict[int, int] = {}
    bodies: list[Any] = []

    @outbox.command(target=target, retries=3)
    def shaky(n: int) -> int:
        attempts[n] = attempts.get(n, 0) + 1
        if attempts[n] < 3:
            raise ConnectionError(f"flaky {n}")
        return n * 10

    @outbox.command(target=target, retries=0)
    def gather(values: list[int]) -> int:
        bodies.append(values)
        return sum(values)

    batch_id = outbox.push(outbox.engine, chord([shaky.s(n) for n in range(4)], gather.s()))
    with run_worker(outbox.app, [target]):
        drain(outbox, timeout=WAIT)
    assert attempts == {0: 3, 1: 3, 2: 3, 3: 3}
    assert bodies == [[0, 10, 20, 30]]
    body = outbox.get(outbox.batch(batch_id).continuation_id)  # type: ignore[arg-type]
    assert (body.status, body.output, body.attempt) == ("completed", 60, 1)


def test_chain_into_group_into_callback_is_a_durable_chord(flow: tuple[Outbox, str, dict[str, Any]]) -> None:
    """chain(add(1, 1), group(double(), double()), total()): Celery's upgrade to a chord, kept durable: the
    group members each get 2, the callback gets [4, 4]."""
    outbox, target, seen = flow
    t = seen["tasks"]
    outbox.push(outbox.engine, chain(t["add"].s(1, 1), group(t["double"].s(), t["double"].s()), t["total"].s()))
    with run_worker(outbox.app, [target]):
        drain(outbox, timeout=WAIT)
    assert seen["total"] == [[4, 4]]


def test_batch_continuation_gets_every_outcome_and_append_works_until_it_finishes(
    flow: tuple[Outbox, str, dict[str, Any]],
) -> None:
    """push_batch(tenant, then=report): members appended in a later transaction are part of the batch; the
    continuation runs once with one outcome per member (failures included, in push order); appending to the
    finished batch raises BatchClosed and writes nothing; tenant statistics count the commands."""
    outbox, target, seen = flow
    t = seen["tasks"]
    ref = outbox.push_batch(outbox.engine, [t["double"].s(1), t["boom"].s(2)], tenant="acme", then=t["report"].s())
    appended = outbox.append_to_batch(outbox.engine, ref.id, [t["double"].s(3)])
    assert outbox.get(appended[0]).tenant == "acme"
    with run_worker(outbox.app, [target]):
        drain(outbox, timeout=WAIT)
    (outcomes,) = seen["report"]
    assert [(o["name"], o["status"], o["output"]) for o in outcomes] == [
        ("double", "completed", 2),
        ("boom", "failed", None),
        ("double", "completed", 6),
    ]
    assert outcomes[1]["error"]["type"] == "ValueError"
    assert outbox.get(ref.continuation_id).status == "completed"  # type: ignore[arg-type]
    with pytest.raises(BatchClosed):
        outbox.append_to_batch(outbox.engine, ref.id, [t["double"].s(4)])
    assert outbox.batch(ref.id).total == 3
    stats = outbox.tenant_stats("acme")
    # the continuation belongs to the batch's tenant too
    assert stats["commands"] == {"completed": 3, "failed": 1} and stats["batches"] == {"finished": 1}


def test_canceled_batch_never_runs_its_continuation(flow: tuple[Outbox, str, dict[str, Any]]) -> None:
    """cancel_batch: pending members become canceled at once, the batch is canceled, and its continuation is
    never inserted - not even when the rescuer's sweep runs."""
    outbox, _target, seen = flow
    t = seen["tasks"]
    ref = outbox.push_batch(outbox.engine, [t["double"].s(i) for i in range(3)], then=t["report"].s())
    assert outbox.cancel_batch(ref.id) == 3
    outbox.rescue_once()
    info = outbox.batch(ref.id)
    assert (info.status, info.counts) == ("canceled", {"canceled": 3})
    assert outbox.store.get(ref.continuation_id) is None  # type: ignore[arg-type]


def test_empty_batch_runs_its_continuation_at_once(flow: tuple[Outbox, str, dict[str, Any]]) -> None:
    """A batch pushed with no member is finished in the same transaction; its continuation gets []."""
    outbox, target, seen = flow
    ref = outbox.push_batch(outbox.engine, [], then=seen["tasks"]["report"].s())
    assert outbox.batch(ref.id).status == "finished"
    with run_worker(outbox.app, [target]):
        drain(outbox, timeout=WAIT)
    assert seen["report"] == [[]]


def test_last_two_members_finishing_together_run_the_continuation_exactly_once(
    make_outbox: Callable[..., Outbox],
) -> None:
    """The race: the last two members of a batch complete at the same moment, in two threads, 30 times over.
    Each time exactly one continuation row exists (the batch row lock plus the open→finished gate)."""
    outbox = make_outbox()
    target = unique_target("race")

    @outbox.command(target=target)
    def member(n: int) -> int:
        return n

    @outbox.command(target=target)
    def after(outcomes: list[Any]) -> None: ...

    for _ in range(30):
        ref = outbox.push_batch(outbox.engine, [member.s(1), member.s(2)], then=after.s())
        started = []
        for d in outbox.store.claim(10, 60.0):
            attempt = outbox.store.start(d.id, d.attempt, d.name, "w", 60.0)
            if d.name == "member":  # not the previous round's continuation
                started.append(attempt)
        assert len(started) == 2
        barrier = threading.Barrier(2)

        def finish(s: Any, barrier: threading.Barrier) -> None:
            barrier.wait(5)
            outbox.store.complete(s.id, s.attempt, s.input["n"], [])

        threads = [threading.Thread(target=finish, args=(s, barrier)) for s in started]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        t = outbox.store.table
        with outbox.engine.connect() as conn:
            continuations = conn.execute(
                sa.select(sa.func.count()).where(t.c.name == "after", t.c.id == ref.continuation_id)
            ).scalar_one()
        assert continuations == 1
        assert outbox.batch(ref.id).status == "finished"


def test_expired_member_settles_its_batch(make_outbox: Callable[..., Outbox], fake_clock: FakeClock) -> None:
    """A member that expires before it starts is final (``expired``, nothing enqueued for it); the batch
    still finishes and its continuation sees the member as expired."""
    outbox = make_outbox(clock=fake_clock)
    target = unique_target("exp")

    @outbox.command(target=target)
    def slow(n: int) -> None: ...

    @outbox.command(target=target)
    def after(outcomes: list[Any]) -> None: ...

    ref = outbox.push_batch(outbox.engine, [slow.options(expires=5).s(1)], then=after.s())
    fake_clock.advance(10)
    assert outbox.store.claim(10, 60.0) == []  # claimed past its expiry: expired, not published
    member = outbox.get(ref.member_ids[0])
    assert (member.status, member.outcome, outbox.children(member.id)) == ("expired", "expired", [])
    continuation = outbox.get(ref.continuation_id)  # type: ignore[arg-type]
    assert continuation.input["outcomes"][0]["status"] == "expired"


def test_error_hook_and_signal_see_every_failed_attempt(make_outbox: Callable[..., Outbox]) -> None:
    """outbox_error_hook and the command_failed signal are called for each failed attempt: the retried ones
    (final=False) and the last one (final=True)."""
    outbox = make_outbox(retry_backoff_base=0.0, error_hook=f"{__name__}.record_failure")
    target = unique_target("hook")
    RECORDED.clear()
    received: list[Any] = []

    def on_failed(sender: Any, failure: Any, **_: Any) -> None:
        if sender is outbox:
            received.append(failure)

    command_failed.connect(on_failed, weak=False)

    @outbox.command(target=target, retries=2)
    def flaky() -> None:
        raise RuntimeError("down")

    try:
        command_id = flaky.push(outbox.engine)
        with run_worker(outbox.app, [target]):
            drain(outbox, timeout=WAIT)
    finally:
        command_failed.disconnect(on_failed)
    assert [(f.id, f.attempt, f.final, f.error.type) for f in RECORDED] == [
        (command_id, 1, False, "RuntimeError"),
        (command_id, 2, False, "RuntimeError"),
        (command_id, 3, True, "RuntimeError"),
    ]
    assert [f.attempt for f in received] == [1, 2, 3]


RECORDED: list[Any] = []


def record_failure(failure: Any) -> None:
    """The error hook of test_error_hook_and_signal_see_every_failed_attempt."""
    RECORDED.append(failure)


def test_workflows_on_the_embedded_sqlite_default(sqlite_outbox: Outbox) -> None:
    """The same features on SQLite (the embedded default): a chord, a batch continuation, a pause that holds a
    target back until resumed, and a schedule tick."""
    outbox = sqlite_outbox
    target = unique_target("lite")
    got: list[Any] = []

    @outbox.command(target=target, retries=0)
    def square(n: int) -> int:
        return n * n

    @outbox.command(target=target, retries=0)
    def collect(values: list[Any]) -> None:
        got.append(values)

    outbox.pause(target=target)
    batch_id = outbox.push(outbox.engine, chord([square.s(2), square.s(3)], collect.s()))
    ref = outbox.push_batch(outbox.engine, [square.s(4)], tenant="t1", then=collect.s())
    assert outbox.relay_once() == 0  # paused
    outbox.resume(target=target)
    outbox.put_schedule("every-minute", square.s(5), "* * * * *")
    outbox.store.set_schedule("every-minute", next_run_at=outbox.store.now())
    (tick,) = outbox.tick_schedules()
    with run_worker(outbox.app, [target]):
        drain(outbox, timeout=WAIT)
    assert got[0] == [4, 9]
    assert [(o["status"], o["output"]) for o in got[1]] == [("completed", 16)]
    assert outbox.batch(batch_id).status == outbox.batch(ref.id).status == "finished"
    assert outbox.get(tick["command_id"]).output == 25


def test_a_plain_task_message_delivered_twice_runs_once(flow: tuple[Outbox, str, dict[str, Any]]) -> None:
    """Guarantee 3 for plain Celery tasks: once adopted, a plain task's outbox message is fenced like a
    command's. The same message delivered twice runs the task once; the second delivery is dropped as stale
    and the recorded output is the first run's. A direct call of the task still runs it as plain Celery."""
    import types

    outbox, _target, seen = flow
    mul = seen["tasks"]["mul"]
    assert outbox.adopt_plain_tasks() >= 1
    command_id = outbox.push(outbox.engine, mul.s(7))
    (claimed,) = outbox.store.claim(10, 60.0)
    request = types.SimpleNamespace(
        outbox=[str(claimed.id), claimed.attempt, claimed.timeout],
        id=f"{claimed.id}:{claimed.attempt}",
        hostname="w",
        called_directly=False,
    )
    assert outbox.executor.execute(mul, request) == 21
    with pytest.raises(AttemptDropped):  # reported to Celery as nothing run (an Ignore), not as a success
        outbox.executor.execute(mul, request)
    assert seen["plain"] == [7]
    assert outbox.executor.dropped["stale"] == 1
    assert (outbox.get(command_id).status, outbox.get(command_id).output) == ("completed", 21)
    assert mul(2) == 6 and seen["plain"] == [7, 2]
