"""Calls of many threads of one process served together: the ones that arrive while one is in flight go next, as one.

A worker's threads pool runs many handlers in one process, and each attempt starts with a
fenced round trip to the database. While one thread waits for its start, the others that
arrive queue up; when its answer comes, the first of them sends every queued start in one
round trip. A thread alone (a prefork child, a quiet worker) runs its own
call at once, as if nothing stood between it and the database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from ..pid import current as current_pid

In = TypeVar("In")
Out = TypeVar("Out")


class _Waiter(Generic[In, Out]):
    __slots__ = ("error", "given", "lead", "result", "woken")

    def __init__(self, given: In) -> None:
        self.given = given
        self.result: Out | None = None
        self.error: BaseException | None = None
        self.lead = False
        self.woken: threading.Event | None = None


class Grouped(Generic[In, Out]):
    """Runs ``one(x)`` for a caller alone, ``many([x, y, ...])`` for the callers that queued behind one in flight.

    ``many`` returns one answer per input, in order. A failure of a grouped call is raised
    in every caller of the group (each of them retries on its own, as after a failure of
    its own call). Each group is sent by one of its own callers: no thread of its own, and
    no caller waits for more than the call in flight before its own goes.
    """

    def __init__(self, one: Callable[[In], Out], many: Callable[[Sequence[In]], Sequence[Out]]) -> None:
        self._one, self._many = one, many
        self._fresh()

    def _fresh(self) -> None:
        """No call in flight, none queued (also in a forked child: its parent's callers are not its own)."""
        self._pid = current_pid()
        self._lock = threading.Lock()
        self._queue: list[_Waiter[In, Out]] = []
        self._busy = False

    def __call__(self, given: In) -> Out:
        if self._pid != current_pid():
            self._fresh()
        waiter: _Waiter[In, Out] = _Waiter(given)
        with self._lock:
            self._queue.append(waiter)
            follow = self._busy
            self._busy = True
            if follow:
                waiter.woken = threading.Event()
        if follow:
            assert waiter.woken is not None
            waiter.woken.wait()
            if not waiter.lead:
                return self._answer(waiter)
        with self._lock:  # leading: this caller's own call and every one queued behind the last group
            group, self._queue = self._queue, []
        self._send(group)
        with self._lock:
            following = self._queue[0] if self._queue else None
            if following is None:
                self._busy = False
            else:
                following.lead = True
        if following is not None:
            assert following.woken is not None
            following.woken.set()
        return self._answer(waiter)

    def _send(self, group: list[_Waiter[In, Out]]) -> None:
        try:
            if len(group) == 1:
                group[0].result = self._one(group[0].given)
            else:
                for waiter, result in zip(group, self._many([w.given for w in group]), strict=True):
                    waiter.result = result
        except BaseException as exc:
            for waiter in group:
                waiter.error = exc
        for waiter in group:
            if waiter.woken is not None and not waiter.lead:
                waiter.woken.set()

    @staticmethod
    def _answer(waiter: _Waiter[In, Out]) -> Out:
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]
