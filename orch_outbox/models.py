"""The outbox's records as callers see them: commands, batches, schedules, failed attempts, workers, jobs."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .jsoncodec import encode
from .schema import FINAL_STATUSES
from .store import ErrorInfo

log = logging.getLogger("orch_outbox")

T = TypeVar("T")


@dataclass(frozen=True)
class BatchRef:
    """A batch just pushed: its id, its members' ids and the id its continuation will have."""

    id: uuid.UUID
    member_ids: list[uuid.UUID]
    continuation_id: uuid.UUID | None


@dataclass(frozen=True)
class BatchInfo:
    """A batch and its progress."""

    id: uuid.UUID
    tenant: str | None
    kind: str
    status: str
    counts: dict[str, int]
    continuation_id: uuid.UUID | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
    first_started_at: dt.datetime | None
    last_finished_at: dt.datetime | None

    @property
    def total(self) -> int:
        """How many members the batch has."""
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        """How many members are final."""
        return sum(n for status, n in self.counts.items() if status in FINAL_STATUSES)

    @property
    def progress(self) -> float:
        """The share of members that are final (1.0 for an empty batch)."""
        return self.done / self.total if self.total else 1.0

    def to_json(self) -> dict[str, Any]:
        """The batch as plain JSON data."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data.update(total=self.total, done=self.done, progress=round(self.progress, 4))
        encoded: dict[str, Any] = encode(data)
        return encoded


@dataclass(frozen=True)
class ScheduleInfo:
    """A cron schedule."""

    name: str
    command: str
    input: dict[str, Any]
    cron: str
    timezone: str
    target: str
    tenant: str | None
    priority: int
    retries: int
    timeout: float
    enabled: bool
    unique: bool
    next_run_at: dt.datetime
    last_run_at: dt.datetime | None
    last_command_id: uuid.UUID | None
    skipped: int
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def from_row(cls, row: Any) -> ScheduleInfo:
        values = dict(row)
        values["unique"] = values.pop("is_unique")
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The schedule as plain JSON data."""
        encoded: dict[str, Any] = encode({k: getattr(self, k) for k in self.__dataclass_fields__})
        return encoded


@dataclass(frozen=True)
class CommandInfo:
    """A command as the outbox records it."""

    id: uuid.UUID
    name: str
    target: str
    status: str
    priority: int
    input: dict[str, Any]
    output: Any
    attempt: int
    retries: int
    retries_left: int
    timeout: float
    outcome: str | None
    error: ErrorInfo | None
    parent_id: uuid.UUID | None
    worker: str | None
    created_at: dt.datetime
    scheduled_at: dt.datetime
    expires_at: dt.datetime | None
    dispatched_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    lease_expires_at: dt.datetime | None
    unique_key: str | None = None
    cancel_requested_at: dt.datetime | None = None
    tenant: str | None = None
    batch_id: uuid.UUID | None = None
    chain: list[dict[str, Any]] | None = None
    #: None for a command, ``"job"`` for a long-running job
    kind: str | None = None
    #: the push's trace context (W3C ``traceparent``/``tracestate``), when a tracer recorded it
    trace: dict[str, str] | None = None

    @property
    def is_final(self) -> bool:
        """True once the command can change no more (completed, failed, canceled or expired)."""
        return self.status in FINAL_STATUSES

    def to_json(self) -> dict[str, Any]:
        """The command as plain JSON data."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "error"}
        data["error"] = None if self.error is None else vars(self.error)
        encoded: dict[str, Any] = encode(data)
        return encoded

    @classmethod
    def from_row(cls, row: Any) -> CommandInfo:
        values = dict(row)
        error = None
        if values.get("error_type"):
            error = ErrorInfo(values["error_type"], values["error_message"] or "", values["error_traceback"])
        for key in ("error_type", "error_message", "error_traceback"):
            values.pop(key, None)
        return cls(error=error, **values)


@dataclass(frozen=True)
class FailedAttempt:
    """What the error hook receives: one attempt that did not succeed."""

    id: uuid.UUID
    name: str
    attempt: int
    outcome: str
    error: ErrorInfo
    final: bool  # True: the command is now failed; False: it will be retried


def _batch_info(row: Any) -> BatchInfo:
    fields = BatchInfo.__dataclass_fields__
    values = {k: row.get(k) for k in fields}
    values["counts"] = values["counts"] or {}
    return BatchInfo(**values)


@dataclass(frozen=True)
class RunningAttempt:
    """One attempt a worker runs now, as the monitor lists it under its worker."""

    id: uuid.UUID
    name: str
    kind: str
    status: str
    attempt: int
    started_at: dt.datetime | None

    def to_json(self) -> dict[str, Any]:
        """The attempt as plain JSON data."""
        encoded: dict[str, Any] = encode(vars(self))
        return encoded


@dataclass(frozen=True)
class WorkerInfo:
    """A live (or not yet reaped) worker of the registry, by its Celery nodename, with what it runs now."""

    name: str
    incarnation: str
    hostname: str
    pid: int
    pool: str
    concurrency: int
    queues: list[str]
    max_jobs: int
    version: str
    started_at: dt.datetime
    last_seen_at: dt.datetime
    running: list[RunningAttempt]

    @property
    def jobs(self) -> list[RunningAttempt]:
        """The jobs among what it runs."""
        return [r for r in self.running if r.kind == "job"]

    def to_json(self) -> dict[str, Any]:
        """The worker as plain JSON data (its running attempts included)."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "running"}
        encoded: dict[str, Any] = encode(data)
        encoded["running"] = [r.to_json() for r in self.running]
        return encoded


@dataclass(frozen=True)
class JobInfo:
    """A long-running job as the outbox records it."""

    id: uuid.UUID
    name: str
    command: str
    argument: Any
    target: str
    status: str
    attempt: int
    worker: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    outcome: str | None
    error: ErrorInfo | None
    stop_requested: bool

    @classmethod
    def from_row(cls, row: Any) -> JobInfo:
        error = None
        if row.get("error_type"):
            error = ErrorInfo(row["error_type"], row["error_message"] or "", row["error_traceback"])
        key = row.get("unique_key") or ""
        return cls(
            row["id"],
            key.split(":", 1)[1] if key.startswith("job:") else key,
            row["name"],
            (row.get("input") or {}).get("argument"),
            row["target"],
            row["status"],
            row["attempt"],
            row.get("worker"),
            row["created_at"],
            row.get("started_at"),
            row.get("finished_at"),
            row.get("outcome"),
            error,
            row.get("cancel_requested_at") is not None,
        )

    def to_json(self) -> dict[str, Any]:
        """The job as plain JSON data."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "error"}
        data["error"] = None if self.error is None else vars(self.error)
        encoded: dict[str, Any] = encode(data)
        return encoded


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing: its items, and how many there are in all."""

    items: list[T]
    total: int
    limit: int | None
    offset: int

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class AttemptInfo:
    """One attempt of a command: who ran it, when, and how it ended (the history keeps the ones that failed)."""

    attempt: int
    worker: str | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    outcome: str | None
    error: ErrorInfo | None

    @classmethod
    def from_row(cls, row: Any) -> AttemptInfo:
        error = None
        if row.get("error_type"):
            error = ErrorInfo(row["error_type"], row.get("error_message") or "", row.get("error_traceback"))
        return cls(
            row["attempt"], row.get("worker"), row.get("started_at"), row.get("finished_at"), row.get("outcome"), error
        )

    def to_json(self) -> dict[str, Any]:
        """The attempt as plain JSON data."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "error"}
        data["error"] = None if self.error is None else vars(self.error)
        encoded: dict[str, Any] = encode(data)
        return encoded
