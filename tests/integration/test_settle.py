"""One way an attempt ends (settle.py), as the rescuer uses it: on SQLite and on PostgreSQL, injected clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orch_outbox import Outbox

from .support import FakeClock, new_app, unique_target


@pytest.fixture(params=["sqlite", "pg"])
def timed(
    request: pytest.FixtureRequest, make_outbox: Callable[..., Outbox], fake_clock: FakeClock, tmp_path: Path
) -> Iterator[Outbox]:
    """An outbox whose store reads ``fake_clock``, on each database."""
    if request.param == "pg":
        yield make_outbox(clock=fake_clock)
        return
    outbox = Outbox(
        new_app(),
        f"sqlite:///{tmp_path}/settle.sqlite3",
        clock=fake_clock,
        lock_buffer=2.0,
        retry_backoff="fixed",
        retry_backoff_base=0.0,
    )
    outbox.create_tables()
    yield outbox
    outbox.close()
    outbox.engine.dispose()


def _start_due(outbox: Outbox, timeout: float) -> int:
    """Claim every due command and start each, as a worker would; returns how many."""
    claimed = outbox.store.claim(100, 30)
    for dispatch in claimed:
        assert outbox.store.start(dispatch.id, dispatch.attempt, dispatch.name, "w1", timeout + 2) is not None
    return len(claimed)


def test_a_raising_hook_never_stops_a_rescue_pass(timed: Outbox, fake_clock: FakeClock) -> None:
    """Regression (DESIGN guarantee 11): a lapsed command whose if_failed hook raises is settled failed
    (without its chained commands, the hook's error kept in the message) and does not stop the pass: the
    other lapsed command, started after it, is settled in the same pass; a second pass finds nothing left."""
    outbox = timed
    target = unique_target("settle")

    @outbox.command(target=target, timeout=5, retries=0)
    def fragile() -> None: ...

    @fragile.if_failed
    def _(outcome: Any) -> list[Any]:
        raise RuntimeError("hook broke")

    @outbox.command(target=target, timeout=5, retries=1)
    def plain() -> None: ...

    first = fragile.push(outbox.engine)
    second = plain.push(outbox.engine)
    assert _start_due(outbox, 5) == 2
    fake_clock.advance(60)
    assert outbox.rescue_once() == 2
    assert outbox.rescue_once() == 0
    assert outbox.rescue_once() == 0
    failed, retried = outbox.get(first), outbox.get(second)
    assert (failed.status, failed.outcome) == ("failed", "lost")
    assert failed.error is not None and "hook broke" in failed.error.message
    assert outbox.children(first) == []
    assert (retried.status, retried.retries_left, retried.outcome) == ("pending", 0, "lost")


def test_the_rescuer_backs_off_by_the_real_retry_number(timed: Outbox, fake_clock: FakeClock) -> None:
    """Regression: a lost attempt is retried after the backoff of *its* retry number (the rescuer used 1
    always): a command on its third attempt, lost, waits the backoff of retry 3."""
    outbox = timed
    target = unique_target("backoff")
    asked: list[int] = []

    def backoff(retry_number: int, error_type: str) -> float:
        asked.append(retry_number)
        return 10.0 * retry_number

    @outbox.command(target=target, timeout=5, retries=5, backoff=backoff)
    def job() -> None: ...

    command_id = job.push(outbox.engine)
    for _ in range(3):
        assert _start_due(outbox, 5) == 1
        fake_clock.advance(60)
        assert outbox.rescue_once() == 1
        fake_clock.advance(3600)  # past any backoff: due again
    assert asked == [1, 2, 3]
    info = outbox.get(command_id)
    assert (info.status, info.attempt, info.retries_left) == ("pending", 3, 2)
