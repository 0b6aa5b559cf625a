"""Helpers for tests of code that pushes commands: wait for the outbox, don't sleep.

``drain(outbox)`` runs the relay and the rescuer itself and returns as soon as no command
is left unfinished (or raises after ``timeout``). Use it with a worker running in the
test (``celery.contrib.testing.worker.start_worker``) or with ``eager`` to execute
commands in the calling thread without any broker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import OutboxError
from .schema import FINAL_STATUSES

if TYPE_CHECKING:
    from .outbox import CommandInfo, Outbox


class DrainTimeout(OutboxError, TimeoutError):
    """The outbox still had unfinished commands when the wait ran out."""


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        event.wait(interval)


def drain(outbox: Outbox, timeout: float = 30.0, relay: bool = True) -> None:
    """Relay due commands until every command is final; raises DrainTimeout with the leftovers."""

    def finished() -> bool:
        if relay:
            outbox.relay_once()
            outbox.rescue_once()
        return outbox.store.unfinished() == 0

    try:
        wait_until(finished, timeout, what="the outbox to drain")
    except TimeoutError:
        left = [(t, s, n) for t, s, n in outbox.store.counts() if s not in FINAL_STATUSES]
        raise DrainTimeout(f"outbox not drained after {timeout}s; unfinished (target, status, count): {left}") from None


def wait_for_status(outbox: Outbox, command_id: uuid.UUID, *statuses: str, timeout: float = 30.0) -> CommandInfo:
    """Wait until a command reaches one of ``statuses``; returns it."""
    result: CommandInfo = wait_until(
        lambda: (info := outbox.get(command_id)).status in statuses and info,
        timeout,
        what=f"command {command_id} to reach {statuses}",
    )
    return result
