"""Handler timeouts: one thread per process, woken only for deadlines that still matter."""

from __future__ import annotations

import math
import threading
import time

import pytest

from orch_outbox.errors import CommandTimeout
from orch_outbox.running import DEADLINES, Guard


def test_guards_that_ended_leave_no_deadline_behind() -> None:
    """Proves the timeouts thread is not woken a timeout after each handler that already returned: 500 handlers
    that ran within their timeouts, in turn, leave no guard for it to watch (each used to leave one, which the
    thread woke for 60 s later)."""
    guards = [Guard(60.0) for _ in range(500)]
    for guard in guards:
        with guard:
            assert guard in DEADLINES._live
    assert not any(guard in DEADLINES._live for guard in guards)


def test_a_timeout_still_fires_after_many_guards_ended() -> None:
    """Proves dropping ended guards keeps a live one: a handler past its timeout still gets CommandTimeout."""
    for _ in range(50):
        with Guard(60.0):
            pass
    caught = threading.Event()
    with pytest.raises(CommandTimeout), Guard(0.05):
        for _ in range(500):  # bounded: the timeout arrives within 5 s
            caught.wait(0.01)


def test_handlers_that_start_do_not_wake_the_timeouts_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves the timeouts thread is woken only by a deadline earlier than the one it sleeps until: a hundred
    handlers with the same timeout start and end without a single wake-up (each one woke it before, taking the
    GIL from the handler's thread); a shorter timeout still fires (the next test)."""
    with Guard(60.0):
        pass
    pause = threading.Event()
    for _ in range(500):  # bounded: the thread is asleep, until its deadline, within 5 s
        with DEADLINES._cond:
            if DEADLINES._wake_at < math.inf:
                break
        pause.wait(0.01)
    woken: list[int] = []
    monkeypatch.setattr(DEADLINES._cond, "notify", lambda n=1: woken.append(n))
    for _ in range(100):
        with Guard(60.0):
            pass
    assert woken == []


def test_an_extended_timeout_fires_at_its_new_deadline_only() -> None:
    """Proves a heartbeat's extension moves the timeout both ways: extended past the first deadline, the handler
    runs on after it (the timeouts thread looks at the deadline, not at what it was scheduled with); shortened
    below the deadline the thread sleeps until, it wakes for it and the handler gets CommandTimeout."""
    pause = threading.Event()
    with Guard(0.2) as guard:
        guard.extend(60.0)
        first_due = guard.started + 0.2
        for _ in range(500):  # bounded: 5 s; past the first deadline, and a look of the thread after it
            if time.monotonic() > first_due + 0.3:
                break
            pause.wait(0.01)
        assert guard.fired is None
    with pytest.raises(CommandTimeout), Guard(60.0) as guard:
        guard.extend(0.05)
        for _ in range(500):  # bounded: the timeout arrives within 5 s
            pause.wait(0.01)
