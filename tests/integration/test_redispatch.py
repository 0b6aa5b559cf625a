"""No redispatch storm: a message merely queued behind others is not redone when its dispatch lease lapses.

The rescuer asks the broker how many messages the target's queue holds; while it holds
any, the lapsed leases of that target are renewed (the message is waiting its turn); an
empty queue, or a broker that cannot say, is the evidence of a loss and the row goes back
to pending as before. The clock is injected: no test waits.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from orch_outbox import Outbox
from orch_outbox.rescuer import Rescuer

from .support import FakeClock, unique_target

pytestmark = pytest.mark.pg

TIMEOUT = 5.0


def dispatched_outbox(make_outbox: Callable[..., Outbox], clock: FakeClock, n: int) -> tuple[Outbox, str]:
    outbox = make_outbox(clock=clock, dispatch_timeout=TIMEOUT)

    @outbox.command(name="noop")
    def noop(i: int) -> int:
        return i

    target = unique_target("slow")
    with outbox.engine.begin() as conn:
        outbox.push_many(conn, [noop.s(i).set(queue=target) for i in range(n)])
    assert len(outbox.store.claim(100, TIMEOUT)) == n
    return outbox, target


def rescuer(outbox: Outbox, depth: Callable[[str], int | None]) -> Rescuer:
    return Rescuer(outbox.store, outbox.settler, outbox.results, queue_depth=depth, dispatch_timeout=TIMEOUT)


def test_a_queue_that_still_holds_messages_keeps_its_dispatches(
    make_outbox: Callable[..., Outbox], fake_clock: FakeClock
) -> None:
    """Proves lapsed dispatch leases of a target whose queue holds messages are renewed, not released: the rows
    stay dispatched with the same attempt (no new message, no new attempt) and lapse again only a timeout later."""
    outbox, target = dispatched_outbox(make_outbox, fake_clock, 5)
    depths: list[str] = []
    rescue = rescuer(outbox, lambda t: depths.append(t) or 3)
    fake_clock.advance(TIMEOUT + 1)
    assert rescue.run_once() == 0
    assert depths == [target]
    rows = outbox.store.find(limit=10, target=target)
    assert {(r["status"], r["attempt"]) for r in rows} == {("dispatched", 1)}
    fake_clock.advance(TIMEOUT - 1)
    assert rescue.run_once() == 0 and len(depths) == 1  # renewed: not lapsed yet, the broker is not asked


def test_an_empty_queue_is_evidence_of_loss(make_outbox: Callable[..., Outbox], fake_clock: FakeClock) -> None:
    """Proves a lapsed dispatch whose queue is empty goes back to pending (to be published again), as does one
    whose broker cannot say (None)."""
    for depth in (0, None):
        outbox, target = dispatched_outbox(make_outbox, fake_clock, 2)
        fake_clock.advance(TIMEOUT + 1)
        assert rescuer(outbox, lambda _t, d=depth: d).run_once() == 2  # type: ignore[misc]
        assert {r["status"] for r in outbox.store.find(limit=10, target=target)} == {"pending"}
