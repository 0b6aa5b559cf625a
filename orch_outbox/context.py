"""What a running handler can learn about the command it is executing."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import OutboxError

_local = threading.local()


@dataclass(frozen=True)
class CommandContext:
    """The command a handler is executing: ``orch_outbox.current()`` inside a handler."""

    id: uuid.UUID
    name: str
    target: str
    attempt: int
    retries: int
    retries_left: int
    _heartbeat: Callable[[float | None], None] | None = field(default=None, repr=False, compare=False)
    _cancel_requested: Callable[[], bool] | None = field(default=None, repr=False, compare=False)
    #: set when a job is asked to stop (jobs only; a command is interrupted instead)
    _stop: threading.Event | None = field(default=None, repr=False, compare=False)

    def heartbeat(self, seconds: float | None = None) -> None:
        """Say the handler is alive and needs ``seconds`` more (default: its timeout), from now.

        Moves both the run deadline (the lease the rescuer watches: now + seconds + lock
        buffer, from the database clock) and the handler's own timeout. Raises
        :class:`~orch_outbox.errors.CommandCanceled` when a cancellation was requested,
        and :class:`~orch_outbox.errors.LeaseLost` when this attempt no longer holds the
        command (its lease lapsed and it was rescued): stop work in either case.
        """
        if self._heartbeat is None:
            raise OutboxError("heartbeat() is only available inside a command handler run by a worker")
        self._heartbeat(seconds)

    def cancel_requested(self) -> bool:
        """True once a cancellation of this command was requested (one database read)."""
        if self._cancel_requested is None:
            return False
        return self._cancel_requested()

    @property
    def canceled(self) -> bool:
        """True once this job was asked to stop: stopped or canceled, or its worker is leaving or lost its hold.

        A job's loop reads it (no database read: the worker learns of a stop within a
        second); a command's handler is interrupted with ``CommandCanceled`` instead, and
        for it this stays False.
        """
        return self._stop is not None and self._stop.is_set()

    @property
    def is_retry(self) -> bool:
        """True when an earlier attempt of this command failed."""
        return self.retries_left < self.retries


def context_of(
    started: Any,
    heartbeat: Callable[[float | None], None],
    cancel_requested: Callable[[], bool],
    stop: threading.Event | None = None,
) -> CommandContext:
    """The context of an attempt as a worker started it (``store.Started``: its id, name, target, attempt and
    retries), with what its ``heartbeat()`` and ``cancel_requested()`` call."""
    return CommandContext(
        started.id,
        started.name,
        started.target,
        started.attempt,
        started.retries,
        started.retries_left,
        _heartbeat=heartbeat,
        _cancel_requested=cancel_requested,
        _stop=stop,
    )


def current() -> CommandContext:
    """The command the calling handler is executing; raises outside a handler."""
    ctx: CommandContext | Callable[[], CommandContext] | None = getattr(_local, "ctx", None)
    if ctx is None:
        raise OutboxError("orch_outbox.current() is only available inside a command handler")
    if not isinstance(ctx, CommandContext):  # made on first use: most handlers never ask
        ctx = _local.ctx = ctx()
    return ctx


def _set(ctx: CommandContext | Callable[[], CommandContext] | None) -> None:
    """The calling thread's command from now on: a context, or what makes it when a handler first asks."""
    _local.ctx = ctx
