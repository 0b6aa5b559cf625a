"""The attempt history: every attempt that ended without a success is kept, bounded, and goes with its command.

On SQLite and PostgreSQL (the trigger is written once per dialect), driven by the store's own statements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from orch_outbox import Outbox
from orch_outbox.executor import attempt_of
from orch_outbox.schema import HISTORY_ATTEMPTS, HISTORY_TRACEBACK_CHARS
from orch_outbox.store import ErrorInfo

from .support import FakeClock, new_app, unique_target


@pytest.fixture(params=["sqlite", "pg"])
def either(
    request: pytest.FixtureRequest, make_outbox: Callable[..., Outbox], fake_clock: FakeClock, tmp_path: Path
) -> Iterator[Outbox]:
    """An outbox on each database, its store on ``fake_clock``."""
    if request.param == "pg":
        yield make_outbox(clock=fake_clock)
        return
    outbox = Outbox(
        new_app(), f"sqlite:///{tmp_path}/history.sqlite3", clock=fake_clock, lock_buffer=2.0, retry_backoff_base=0.0
    )
    outbox.create_tables()
    yield outbox
    outbox.close()
    outbox.engine.dispose()


def _run_and_fail(outbox: Outbox, command_id: Any, worker: str, message: str, traceback: str | None = None) -> None:
    """Claim, start and fail the next attempt of a command, as a worker would."""
    (claimed,) = [d for d in outbox.store.claim(10, 30) if d.id == command_id]
    started = outbox.store.start(command_id, claimed.attempt, claimed.name, worker, 30)
    assert started is not None
    ending = outbox.settler.failed(attempt_of(started), "failure", ErrorInfo("ValueError", message, traceback))
    assert ending.status in ("pending", "failed")


def test_a_flaky_command_shows_both_attempts(either: Outbox) -> None:
    """Proves the history keeps the failed first attempt of a command that then succeeded: ``attempts(id)`` lists
    attempt 1 (its worker, outcome and error) and attempt 2 (the success, from the command itself)."""
    outbox = either

    @outbox.command(target=unique_target("flaky"), retries=2)
    def flaky() -> None: ...

    cid = flaky.push(outbox.engine)
    _run_and_fail(outbox, cid, "w1@host", "first try broke")
    (claimed,) = outbox.store.claim(10, 30)
    assert outbox.store.start(cid, claimed.attempt, "flaky", "w2@host", 30) is not None
    assert outbox.store.complete(cid, claimed.attempt, {"ok": True}, [])
    attempts = outbox.attempts(cid)
    assert [(a.attempt, a.worker, a.outcome) for a in attempts] == [
        (1, "w1@host", "failure"),
        (2, "w2@host", "success"),
    ]
    assert attempts[0].error is not None and attempts[0].error.message == "first try broke"
    assert attempts[0].started_at is not None and attempts[0].finished_at is not None
    assert attempts[1].error is None


def test_the_history_is_bounded_and_goes_with_its_command(either: Outbox) -> None:
    """Proves the bounds (the last attempts only, a traceback cut to its limit) and that purging a command deletes
    its history with it."""
    outbox = either

    @outbox.command(target=unique_target("many"), retries=HISTORY_ATTEMPTS + 3)
    def stubborn() -> None: ...

    cid = stubborn.push(outbox.engine)
    for n in range(HISTORY_ATTEMPTS + 4):
        _run_and_fail(outbox, cid, "w1@host", f"failure {n + 1}", "x" * (HISTORY_TRACEBACK_CHARS + 500))
    assert outbox.get(cid).status == "failed"
    kept = outbox.store.attempt_history(cid)
    assert len(kept) == HISTORY_ATTEMPTS
    assert [r["attempt"] for r in kept][-1] == HISTORY_ATTEMPTS + 4
    assert all(len(r["error_traceback"]) == HISTORY_TRACEBACK_CHARS for r in kept)
    assert outbox.purge([cid]) == 1
    assert outbox.store.attempt_history(cid) == []
