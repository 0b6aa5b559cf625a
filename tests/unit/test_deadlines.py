"""Handler timeouts: one thread per process, woken only for deadlines that still matter."""

from __future__ import annotations

import threading

import pytest

from orch_outbox.errors import CommandTimeout
from orch_outbox.running import DEADLINES, Guard


def test_guards_that_ended_leave_no_deadline_behind() -> None:
    """Proves the timeouts thread is not woken a timeout after each handler that already returned: 500 handlers
    that ran within their timeouts, in turn, leave no ended deadline in the heap (each used to leave one, which
    the thread woke for 60 s later)."""
    for _ in range(500):
        with Guard(60.0):
            pass
    with DEADLINES._cond:
        ended = [entry for entry in DEADLINES._heap if not entry[2].pending(entry[1])]
    assert ended == []


def test_a_timeout_still_fires_after_many_guards_ended() -> None:
    """Proves dropping ended guards keeps a live one: a handler past its timeout still gets CommandTimeout."""
    for _ in range(50):
        with Guard(60.0):
            pass
    caught = threading.Event()
    with pytest.raises(CommandTimeout), Guard(0.05):
        for _ in range(500):  # bounded: the timeout arrives within 5 s
            caught.wait(0.01)
