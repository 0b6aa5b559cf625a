"""Bounded waits: poll a state until it holds, or fail with a description of what was awaited.

Every loop here is bounded twice, in time (``timeout``) and in count (the number of polls
that ``timeout / interval`` allows, plus the first and the last); nothing sleeps except
the pause between two polls of a state.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

#: A description of what is awaited: a text, or a function returning one (called only on timeout,
#: so that it can append an expensive report: the rows of a table, the logs of processes).
Describe = str | Callable[[], str]


def polls(timeout: float, interval: float) -> int:
    """How many times a wait of ``timeout`` seconds polls every ``interval`` seconds at most."""
    return max(1, math.ceil(timeout / max(interval, 1e-3))) + 2


def describe_text(describe: Describe) -> str:
    return describe() if callable(describe) else describe


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, describe: Describe = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value, which is returned.

    Raises AssertionError ``timed out after <timeout>s waiting for <describe>`` once ``timeout``
    seconds have passed (or the count of polls is used up). An exception raised by the
    predicate (e.g. "the worker exited while we waited") propagates at once.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: wait() is a bounded pause between two polls
    for _ in range(polls(timeout, interval)):
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        pause.wait(min(interval, remaining))
    raise AssertionError(f"timed out after {timeout}s waiting for {describe_text(describe) or predicate}")
