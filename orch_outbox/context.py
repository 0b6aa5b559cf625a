"""What a running handler can learn about the command it is executing."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

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

    @property
    def is_retry(self) -> bool:
        """True when an earlier attempt of this command failed."""
        return self.retries_left < self.retries


def current() -> CommandContext:
    """The command the calling handler is executing; raises outside a handler."""
    ctx: CommandContext | None = getattr(_local, "ctx", None)
    if ctx is None:
        raise OutboxError("orch_outbox.current() is only available inside a command handler")
    return ctx


def _set(ctx: CommandContext | None) -> None:
    _local.ctx = ctx
