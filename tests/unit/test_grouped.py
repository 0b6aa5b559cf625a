"""Calls that arrive while one is in flight go next, together, and each caller gets its own answer."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from orch_outbox.store.grouped import Grouped

WAIT = 10.0


class Gate:
    """``one``/``many`` that record their calls; the first call waits until the test opens the gate."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail_many = False

    def one(self, x: int) -> int:
        self.calls.append([x])
        self.entered.set()
        assert self.gate.wait(WAIT)
        return x * 10

    def many(self, xs: Sequence[int]) -> list[int]:
        self.calls.append(list(xs))
        if self.fail_many:
            raise ConnectionError("database away")
        return [x * 10 for x in xs]


def _wait_queued(grouped: Grouped[int, int], n: int) -> None:
    """Wait (bounded) until ``n`` callers queue behind the call in flight."""
    pause = threading.Event()
    for _ in range(1000):
        with grouped._lock:
            if len(grouped._queue) == n:
                return
        pause.wait(0.01)
    raise AssertionError(f"{n} callers never queued")


def _one_in_flight_then_others(gate: Gate, grouped: Grouped[int, int], call: Callable[[int], None], n: int) -> None:
    """``call(1)`` in flight (held at the gate), then ``call(2..n+1)`` queued behind it; the gate opened and every
    caller finished (bounded)."""
    first = threading.Thread(target=call, args=(1,))
    first.start()
    assert gate.entered.wait(WAIT)
    others = [threading.Thread(target=call, args=(x,)) for x in range(2, n + 2)]
    for thread in others:
        thread.start()
    _wait_queued(grouped, n)
    gate.gate.set()
    for thread in [first, *others]:
        thread.join(WAIT)
        assert not thread.is_alive()


def test_a_caller_alone_goes_at_once_and_those_queued_behind_it_go_next_as_one() -> None:
    """Proves the grouping: a lone call runs by itself; three calls made while it is in flight run as one group
    (one call of ``many``), and each caller gets the answer to its own input, not another's."""
    gate = Gate()
    grouped: Grouped[int, int] = Grouped(gate.one, gate.many)
    answers: dict[int, int] = {}

    def call(x: int) -> None:
        answers[x] = grouped(x)

    _one_in_flight_then_others(gate, grouped, call, 3)
    assert gate.calls[0] == [1] and sorted(gate.calls[1]) == [2, 3, 4] and len(gate.calls) == 2
    assert answers == {1: 10, 2: 20, 3: 30, 4: 40}
    assert grouped(5) == 50 and gate.calls[-1] == [5]  # alone again: at once, by itself


def test_a_failed_group_fails_each_of_its_callers_and_the_next_caller_still_goes() -> None:
    """Proves a failure reaches every caller of the group that failed (each retries on its own), and leaves the
    grouping usable: nobody is left waiting, and a later call runs."""
    gate = Gate()
    gate.fail_many = True
    grouped: Grouped[int, int] = Grouped(gate.one, gate.many)
    errors: list[BaseException] = []

    def call(x: int) -> None:
        try:
            grouped(x)
        except ConnectionError as exc:
            errors.append(exc)

    _one_in_flight_then_others(gate, grouped, call, 2)
    assert len(errors) == 2  # both callers of the failed group, and only they (the first one's call succeeded)
    assert grouped(7) == 70


def test_a_forked_child_starts_with_no_call_in_flight() -> None:
    """Proves a process forked while a call was in flight in its parent does not wait for it: the child's first
    call runs at once (its parent's callers are not its own)."""
    import os

    gate = Gate()
    grouped: Grouped[int, int] = Grouped(gate.one, gate.many)
    first = threading.Thread(target=grouped, args=(1,))
    first.start()
    assert gate.entered.wait(WAIT)  # the parent's call is in flight, held at the gate
    pid = os.fork()
    if pid == 0:  # the child: its call must not queue behind the parent's (bounded: WAIT seconds)
        gate.gate.set()
        answer: list[int] = []
        child = threading.Thread(target=lambda: answer.append(grouped(5)), daemon=True)
        child.start()
        child.join(WAIT)
        os._exit(0 if answer == [50] else 1)
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        gate.gate.set()
        first.join(WAIT)
    assert os.waitstatus_to_exitcode(status) == 0
