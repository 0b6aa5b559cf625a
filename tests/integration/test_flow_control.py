"""Flow control in the claim, on PostgreSQL: cluster-wide limits, fair shares between tenants.

The claim is the one place that sees every due command of the cluster; these tests call
it directly (``store.claim`` with the relay's plan) and move an injected clock for rates,
so every figure is exact and no test waits on time.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from orch_outbox import ConfigurationError, Outbox
from orch_outbox.flow import Plan, parse_limits
from orch_outbox.store import Dispatch

from .support import FakeClock, unique_target

pytestmark = pytest.mark.pg


def claim(outbox: Outbox, limit: int = 200) -> list[Dispatch]:
    """One claim as the relay makes it (its plan, its settings)."""
    s = outbox.settings
    return outbox.store.claim(limit, s.dispatch_timeout, s.max_in_flight, plan=outbox.relay.plan())


def push(outbox: Outbox, name: str, count: int, target: str, tenant: str | None = None, priority: int = 0) -> None:
    cmd = outbox.task(name)
    with outbox.engine.begin() as conn:
        outbox.push_many(
            conn, [cmd.s(i).set(queue=target, tenant=tenant, priority=priority) for i in range(count)]
        )  # fmt: skip


def finish(outbox: Outbox, items: list[Dispatch]) -> None:
    """The worker's side, short: start and complete each claimed attempt."""
    for d in items:
        assert outbox.store.start(d.id, d.attempt, d.name, "w@test", 30.0) is not None
        assert outbox.store.complete(d.id, d.attempt, None, [])


@pytest.fixture
def limited(make_outbox: Callable[..., Outbox]) -> Callable[..., Outbox]:
    """``limited(limits, **settings)``: an outbox with one no-op command ``noop`` and those limits."""

    def build(limits: dict[str, Any], clock: Any = None, **settings: Any) -> Outbox:
        outbox = make_outbox(clock=clock, limits=limits, **settings)

        @outbox.command(name="noop")
        def noop(i: int) -> int:
            return i

        return outbox

    return build


def test_concurrency_of_a_target_caps_what_is_in_flight(limited: Callable[..., Outbox]) -> None:
    """Proves `concurrency: 3` on a target: never more than 3 of its commands dispatched or running, the rest stay
    pending; each finished one frees exactly one place; another target is not held back."""
    target, other = unique_target("limited"), unique_target("free")
    outbox = limited({target: {"concurrency": 3}})
    push(outbox, "noop", 10, target)
    push(outbox, "noop", 5, other)
    first = claim(outbox)
    assert Counter(d.target for d in first) == {target: 3, other: 5}
    assert claim(outbox) == []
    finish(outbox, [d for d in first if d.target == target][:2])
    again = claim(outbox)
    assert [d.target for d in again] == [target, target]
    assert outbox.store.count(target=target, status="pending") == 5


def test_held_back_commands_keep_their_priority(limited: Callable[..., Outbox]) -> None:
    """Proves commands held by a limit stay pending with their priority: when a place frees, the highest goes."""
    target = unique_target("prio")
    outbox = limited({target: {"concurrency": 1}})
    push(outbox, "noop", 3, target, priority=0)
    first = claim(outbox)
    push(outbox, "noop", 2, target, priority=9)
    finish(outbox, first)
    (second,) = claim(outbox)
    assert second.priority == 9


def test_command_limit_from_the_decorator(make_outbox: Callable[..., Outbox]) -> None:
    """Proves `@command(concurrency=2)` limits that command across its targets, and a setting for the same key
    wins over the decorator."""
    outbox = make_outbox()

    @outbox.command(name="scarce", concurrency=2)
    def scarce(i: int) -> int:
        return i

    a, b = unique_target("a"), unique_target("b")
    push(outbox, "scarce", 3, a)
    push(outbox, "scarce", 3, b)
    assert len(claim(outbox)) == 2
    wider = make_outbox(table_prefix=outbox.store.prefix, limits={"command:scarce": {"concurrency": 5}})
    wider.app.tasks.register(outbox.task("scarce"))
    assert len(claim(wider)) == 3


def test_each_tenant_gets_its_own_concurrency(limited: Callable[..., Outbox]) -> None:
    """Proves `tenant:*` applies to every tenant on its own and a named tenant's limit wins over it; commands with
    no tenant are not held."""
    target = unique_target("tenants")
    outbox = limited({"tenant:*": {"concurrency": 1}, "tenant:big": {"concurrency": 3}})
    for tenant in ("t1", "t2", "big"):
        push(outbox, "noop", 5, target, tenant=tenant)
    push(outbox, "noop", 2, target)
    taken = Counter(str(outbox.store.get(d.id)["tenant"]) for d in claim(outbox))  # type: ignore[index]
    assert taken == {"t1": 1, "t2": 1, "big": 3, "None": 2}
    assert claim(outbox) == []


def test_rate_spaces_starts_by_the_clock(limited: Callable[..., Outbox], fake_clock: FakeClock) -> None:
    """Proves `rate: "60/m"` with a 1 s poll interval: one start per second of the clock, never more (the bucket
    holds one poll interval's worth), whatever the number of claims."""
    target = unique_target("rate")
    outbox = limited({target: {"rate": "60/m"}}, clock=fake_clock, poll_interval=1.0)
    push(outbox, "noop", 10, target)
    assert len(claim(outbox)) == 1
    assert claim(outbox) == []
    fake_clock.advance(0.5)
    assert claim(outbox) == []
    fake_clock.advance(0.5)
    assert len(claim(outbox)) == 1
    fake_clock.advance(30)  # a long idle time does not save up a burst
    assert len(claim(outbox)) == 1
    assert claim(outbox) == []


def test_rate_burst_is_one_poll_interval(limited: Callable[..., Outbox], fake_clock: FakeClock) -> None:
    """Proves `rate: "10/s"` with a 2 s poll interval lets a claim take 20 at once, then 5 after half a second."""
    target = unique_target("burst")
    outbox = limited({target: {"rate": "10/s"}}, clock=fake_clock, poll_interval=2.0)
    push(outbox, "noop", 100, target)
    assert len(claim(outbox)) == 20
    fake_clock.advance(0.5)
    assert len(claim(outbox)) == 5


def test_fair_shares_between_tenants(make_outbox: Callable[..., Outbox]) -> None:
    """Proves a tenant with 5 000 queued commands does not delay one with 20 pushed after them: all 20 are in the
    first two claim batches (of 200): the first batch meets tenants, the next ones take them in turns."""
    outbox = make_outbox(max_in_flight=0)

    @outbox.command(name="noop")
    def noop(i: int) -> int:
        return i

    target = unique_target("fair")
    push(outbox, "noop", 5000, target, tenant="big")
    push(outbox, "noop", 20, target, tenant="small")
    first, second = claim(outbox, 200), claim(outbox, 200)
    tenants = Counter(str(outbox.store.get(d.id)["tenant"]) for d in first + second)  # type: ignore[index]
    assert tenants == {"small": 20, "big": 380}
    third = claim(outbox, 200)
    assert {outbox.store.get(d.id)["tenant"] for d in third} == {"big"}  # type: ignore[index]


def test_without_fairness_the_order_is_due_time(make_outbox: Callable[..., Outbox]) -> None:
    """Proves `outbox_fair_tenants = False` keeps plain claim order (priority, then due time)."""
    outbox = make_outbox(fair_tenants=False, max_in_flight=0)

    @outbox.command(name="noop")
    def noop(i: int) -> int:
        return i

    target = unique_target("unfair")
    push(outbox, "noop", 300, target, tenant="big")
    push(outbox, "noop", 20, target, tenant="small")
    first, second = claim(outbox, 200), claim(outbox, 100)
    assert {outbox.store.get(d.id)["tenant"] for d in first + second} == {"big"}  # type: ignore[index]


def test_limits_hold_with_two_relays_claiming_at_once(limited: Callable[..., Outbox]) -> None:
    """Proves the counts come from the database under a lock: four relays (own outboxes, own connections) claiming
    in a loop at the same time never dispatch more than the limit of 3 together."""
    target = unique_target("racing")
    first = limited({target: {"concurrency": 3}})
    relays = [first] + [
        limited({target: {"concurrency": 3}}, table_prefix=first.store.prefix) for _ in range(3)
    ]  # fmt: skip
    push(first, "noop", 50, target)
    barrier = threading.Barrier(len(relays), timeout=30)
    taken: list[Dispatch] = []
    lock = threading.Lock()

    def loop(outbox: Outbox) -> None:
        barrier.wait()
        for _ in range(20):
            got = claim(outbox, 2)
            with lock:
                taken.extend(got)

    threads = [threading.Thread(target=loop, args=(o,)) for o in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(taken) == 3
    assert len({d.id for d in taken}) == 3


def test_limit_states_show_what_waits(limited: Callable[..., Outbox]) -> None:
    """Proves the status view of limits: in flight, due, and held when a key is at its limit."""
    target = unique_target("status")
    outbox = limited({target: {"concurrency": 2}, "command:noop": {"concurrency": 50}})
    push(outbox, "noop", 7, target)
    claim(outbox)
    states = {s.key: s for s in outbox.store.limit_states(outbox.relay.plan())}
    assert (states[target].in_flight, states[target].due, states[target].held) == (2, 5, True)
    assert states["command:noop"].held is False


def test_paused_tenants_stay_held_in_the_fair_claim(make_outbox: Callable[..., Outbox]) -> None:
    """Proves a paused tenant is still held back when tenants take turns."""
    outbox = make_outbox()

    @outbox.command(name="noop")
    def noop(i: int) -> int:
        return i

    target = unique_target("pause")
    push(outbox, "noop", 3, target, tenant="paused")
    push(outbox, "noop", 3, target, tenant="open")
    outbox.pause(tenant="paused")
    assert {outbox.store.get(d.id)["tenant"] for d in claim(outbox)} == {"open"}  # type: ignore[index]


def test_bad_limits_are_refused_with_the_key() -> None:
    """Proves a wrong limit is a ConfigurationError naming the key, before anything runs."""
    with pytest.raises(ConfigurationError, match="rate must be like"):
        parse_limits({"q": {"rate": "fast"}})
    with pytest.raises(ConfigurationError, match="concurrency must be >= 1"):
        parse_limits({"q": {"concurrency": 0}})
    with pytest.raises(ConfigurationError, match="give a concurrency, a rate or both"):
        parse_limits({"q": {}})
    with pytest.raises(ConfigurationError, match="expected"):
        parse_limits({"q": {"concurency": 2}})
    assert Plan(parse_limits('{"q": {"concurrency": 2}}')).limited


def test_strict_order_serves_a_workers_queues_in_order(make_outbox: Callable[..., Outbox]) -> None:
    """Proves `outbox_strict_order` with a worker registered on `-Q high,default,low`: the claim publishes to
    `default` only while `high` has nothing waiting (due or published and not started), and `low` last; a
    running `high` command does not hold the others back."""
    from orch_outbox.workers import Identity, Presence

    outbox = make_outbox(strict_order=True, fair_tenants=False)

    @outbox.command(name="noop")
    def noop(i: int) -> int:
        return i

    high, default, low = unique_target("high"), unique_target("default"), unique_target("low")
    Presence(outbox.store, outbox.settings, Identity.of("w@strict", "threads", 4, [high, default, low], 0)).beat_once()
    push(outbox, "noop", 2, low)
    push(outbox, "noop", 2, default)
    push(outbox, "noop", 3, high)
    first = claim(outbox)
    assert {d.target for d in first} == {high}
    assert claim(outbox) == []  # high's messages are in the broker, not started: default waits
    for d in first:
        assert outbox.store.start(d.id, d.attempt, d.name, "w@strict", 30.0) is not None
    second = claim(outbox)  # high is running, nothing of it waits: default's turn, low still waits
    assert {d.target for d in second} == {default}
    for d in second:
        assert outbox.store.start(d.id, d.attempt, d.name, "w@strict", 30.0) is not None
    assert {d.target for d in claim(outbox)} == {low}


def test_without_strict_order_every_queue_is_claimed(make_outbox: Callable[..., Outbox]) -> None:
    """Proves the default: a worker's queue order changes nothing, every due command is claimed at once."""
    from orch_outbox.workers import Identity, Presence

    outbox = make_outbox()

    @outbox.command(name="noop")
    def noop(i: int) -> int:
        return i

    high, low = unique_target("high"), unique_target("low")
    Presence(outbox.store, outbox.settings, Identity.of("w@plain", "threads", 4, [high, low], 0)).beat_once()
    push(outbox, "noop", 2, low)
    push(outbox, "noop", 2, high)
    assert Counter(d.target for d in claim(outbox)) == {high: 2, low: 2}
