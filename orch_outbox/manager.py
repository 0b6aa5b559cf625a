"""``outbox.jobs``: start, stop, read and list long-running jobs (OrchestratR's manager and job monitor).

A job's handler is an ordinary command taking ``name`` and ``argument``; it loops until
``current().canceled`` (or ``CommandCanceled`` at its heartbeat). The worker side is in
``jobs.py``; the registry in ``workers.py``; the reaper in ``reaper.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import InvalidOption, JobNotFound, UnknownCommand
from .models import JobInfo, Page
from .schema import STATUSES
from .states import Kind
from .store import job_key
from .validation import _check_page

if TYPE_CHECKING:
    from celery.canvas import Signature

    from .pushing import Connectable
    from .settings import Settings
    from .store import Store
    from .task import OutboxTask

#: A job's name: what makes it unique among unfinished jobs.
MAX_NAME = 190


class Jobs:
    """Start, stop, read and list jobs of one outbox."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        row_for: Callable[[Signature], dict[str, Any]],
        task: Callable[[str], OutboxTask],
        insert: Callable[[Connectable, list[dict[str, Any]]], list[uuid.UUID]],
        cancel: Callable[[uuid.UUID], bool],
        engine: Any,
    ) -> None:
        self.store = store
        self.settings = settings
        self._row_for = row_for
        self._task = task
        self._insert = insert
        self._cancel = cancel
        self._engine = engine
        self.default: OutboxTask | None = None

    def handler(self, task: OutboxTask) -> OutboxTask:
        """Make a command (declared with ``@outbox.command``) the handler of jobs started without ``command=``."""
        self.default = task
        return task

    def start(
        self,
        name: str,
        argument: Any = None,
        *,
        command: OutboxTask | str | None = None,
        target: str | None = None,
        priority: int | None = None,
        conn: Connectable | None = None,
    ) -> uuid.UUID:
        """Start the job ``name`` (unique among unfinished jobs) with ``argument``; returns its id.

        Starting a name whose job is still pending or running returns that job's id and
        starts nothing. ``command``: the handler (a command, or its name), by default the
        one given to :meth:`handler`. ``target``: the queue whose workers may run it.
        ``conn``: a Session, Connection or Engine whose transaction the start joins.
        """
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name != name.strip():
            raise InvalidOption(f"a job name is 1-{MAX_NAME} characters without surrounding spaces, got {name!r}")
        task = self._handler(command)
        options: dict[str, Any] = {"unique_key": job_key(name), "retries": self.settings.job_retries}
        if target is not None:
            options["target"] = target
        if priority is not None:
            options["priority"] = priority
        row = self._row_for(task.s(name=name, argument=argument).set(**options))
        row["kind"] = Kind.JOB.value
        return self._insert(conn if conn is not None else self._engine, [row])[0]

    def _handler(self, command: OutboxTask | str | None) -> OutboxTask:
        if command is None:
            if self.default is None:
                raise UnknownCommand("no job handler: pass command=..., or declare one with @outbox.jobs.handler")
            return self.default
        return self._task(command) if isinstance(command, str) else command

    def stop(self, name_or_id: str | uuid.UUID) -> bool:
        """Stop a job (a cancellation, with its ``if_canceled`` commands); False if it was not running or pending."""
        return self._cancel(self.get(name_or_id).id)

    def get(self, name_or_id: str | uuid.UUID) -> JobInfo:
        """A job by id, or by name (its newest, unfinished first); raises :class:`JobNotFound`."""
        row = None
        try:
            job_id = name_or_id if isinstance(name_or_id, uuid.UUID) else uuid.UUID(str(name_or_id))
        except ValueError:
            job_id = None
        if job_id is not None:
            row = self.store.get(job_id)
            row = row if row is not None and row.get("kind") == Kind.JOB else None
        if row is None and isinstance(name_or_id, str):
            row = self.store.find_job(name_or_id)
        if row is None:
            raise JobNotFound(f"no job named or numbered {name_or_id!s}")
        return JobInfo.from_row(row)

    def list(
        self, *, status: str | None = None, worker: str | None = None, limit: int | None = 100, offset: int = 0
    ) -> Page[JobInfo]:
        """Jobs, newest first, by status and worker (its nodename); ``limit=None``: all of them."""
        if limit is not None:
            _check_page(limit, offset)
        if status is not None and status not in STATUSES:
            raise InvalidOption(f"status must be one of {STATUSES}, got {status!r}")
        rows, total = self.store.list_jobs(status, worker, limit, offset)
        return Page([JobInfo.from_row(r) for r in rows], total, limit, offset)
