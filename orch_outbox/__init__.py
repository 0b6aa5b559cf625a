"""orch_outbox: a transactional outbox for Celery.

Write commands into an outbox table in your own database transaction; a relay publishes
them as Celery tasks routed by target; workers write the outcome back, fenced, and
enqueue chained commands in the same transaction.
"""

from __future__ import annotations

import uuid
from typing import Any

from .connections import ConnectionAdapter, Connections
from .context import CommandContext, current
from .default import command, default_outbox
from .errors import (
    BatchClosed,
    BatchNotFound,
    CommandCanceled,
    CommandNotFound,
    CommandTimeout,
    ConfigurationError,
    InvalidInput,
    InvalidOption,
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    OutboxError,
    ScheduleNotFound,
    StoreUnavailable,
    TablesMissing,
    UniqueConflict,
    UnknownCommand,
    WorkerLeaving,
    WorkerNotFound,
)
from .flow import Limit
from .manager import Jobs
from .models import JobInfo, Page, RunningAttempt, WorkerInfo
from .outbox import BatchInfo, BatchRef, CommandInfo, FailedAttempt, Outbox, ScheduleInfo
from .schema import FINAL_STATUSES, STATUSES, metadata_for
from .settings import Settings
from .signals import command_failed
from .store import ErrorInfo, LimitState
from .task import OutboxTask, Outcome

__version__ = "0.1.0"

__all__ = [
    "FINAL_STATUSES",
    "STATUSES",
    "BatchClosed",
    "BatchInfo",
    "BatchNotFound",
    "BatchRef",
    "CommandCanceled",
    "CommandContext",
    "CommandInfo",
    "CommandNotFound",
    "CommandTimeout",
    "ConfigurationError",
    "ConnectionAdapter",
    "Connections",
    "ErrorInfo",
    "FailedAttempt",
    "InvalidInput",
    "InvalidOption",
    "InvalidTransition",
    "JobInfo",
    "JobNotFound",
    "Jobs",
    "LeaseLost",
    "Limit",
    "LimitState",
    "Outbox",
    "OutboxError",
    "OutboxTask",
    "Outcome",
    "Page",
    "RunningAttempt",
    "ScheduleInfo",
    "ScheduleNotFound",
    "Settings",
    "StoreUnavailable",
    "TablesMissing",
    "UniqueConflict",
    "UnknownCommand",
    "WorkerInfo",
    "WorkerLeaving",
    "WorkerNotFound",
    "app",
    "cancel",
    "command",
    "command_failed",
    "current",
    "default_outbox",
    "get",
    "metadata_for",
    "push",
    "push_batch",
    "push_many",
]


def push(conn: Any, call: Any = None, *, tenant: str | None = None) -> uuid.UUID:
    """Push a command signature (``send_email.s(...)``) or a canvas through the ready app's outbox."""
    return default_outbox().push(conn, call, tenant=tenant)


def push_batch(conn: Any, calls: Any = None, *, tenant: str | None = None, then: Any = None) -> BatchRef:
    """Push commands as one batch through the ready app's outbox (see :meth:`Outbox.push_batch`)."""
    return default_outbox().push_batch(conn, calls, tenant=tenant, then=then)


def push_many(conn: Any, calls: Any = None) -> list[uuid.UUID]:
    """Push many command signatures in one statement through the ready app's outbox."""
    return default_outbox().push_many(conn, calls)


def get(command_id: uuid.UUID | str) -> CommandInfo:
    """A command of the ready app's outbox, by id."""
    return default_outbox().get(command_id)


def cancel(command_id: uuid.UUID | str) -> bool:
    """Cancel a command of the ready app's outbox (see :meth:`Outbox.cancel`)."""
    return default_outbox().cancel(command_id)


def __getattr__(name: str) -> Any:
    # ``celery -A orch_outbox`` looks up ``orch_outbox.app``; build it only then.
    if name in ("app", "celery"):
        return default_outbox().app
    raise AttributeError(f"module 'orch_outbox' has no attribute {name!r}")
