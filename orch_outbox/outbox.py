"""The Outbox: one outbox table attached to one Celery app.

``Outbox(app, engine)`` registers the relay and the lease rescuer as tasks, adds them to
the beat schedule, and offers the ``@outbox.command`` decorator, ``push`` and the
calls that read and cancel commands. ``orch_outbox.app`` is a ready-made Celery app
with an Outbox attached; library mode attaches one to an application's own app.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from celery import Celery, signals

from . import backoff as backoff_mod
from . import control, request
from .cleaner import Cleaner
from .clock import Clock
from .errors import (
    ConfigurationError,
)
from .executor import Executor
from .jobs import JobRunner
from .listener import ListeningRelay
from .manager import Jobs
from .models import BatchInfo, BatchRef, CommandInfo, FailedAttempt, Page, ScheduleInfo, WorkerInfo
from .monitor import Monitor
from .operations import Operations
from .pushing import Pushing
from .reaper import Reaper
from .registry import attach, outbox_of
from .relay import Relay
from .rescuer import Rescuer
from .results import Results
from .scheduler import Scheduler
from .scheduling import Scheduling
from .settings import Settings
from .settle import Settler
from .signals import command_failed
from .store import ErrorInfo, LimitState, Store, make_engine
from .telemetry import Telemetry
from .validation import (
    PUSH_OPTIONS,
    command_name,
)
from .wiring import Wiring
from .workers import Presence

log = logging.getLogger("orch_outbox")


class Outbox(Pushing, Operations, Scheduling, Wiring):
    """An outbox table attached to a Celery app.

    ``push_options``: the options a push (or a command's ``apply_async``) takes.

    :param app: the Celery app whose workers run the commands.
    :param engine: a SQLAlchemy engine or URL; by default ``outbox_database_url``.
    :param clock: replaces the clock (tests); then the database clock is not used.
    :param settings: overrides of ``outbox_*`` settings, by name without the prefix.
    """

    push_options = PUSH_OPTIONS

    def __init__(
        self, app: Celery, engine: sa.Engine | str | None = None, *, clock: Clock | None = None, **settings: Any
    ) -> None:
        Settings.from_sources({}, env={}, **settings)  # bad overrides fail here, before the app is touched
        self.app = app
        self._engine_arg = engine
        self._clock = clock
        self._overrides = settings
        #: this worker in the registry, and its jobs (set when a worker of this app starts)
        self.presence: Presence | None = None
        self.runner: JobRunner | None = None
        attach(app, self)
        self._register_service_tasks()
        if app.configured:
            self._add_beat_entries(app)
        else:
            app.on_after_configure.connect(self._add_beat_entries, weak=False)
        signals.task_unknown.connect(self._on_task_unknown, weak=False)
        signals.worker_process_init.connect(self._after_fork, weak=False)
        signals.worker_init.connect(self._check_at_start, weak=False)
        signals.worker_init.connect(self._adopt_plain_tasks, weak=False)
        signals.worker_init.connect(self._start_write_back, weak=False)
        signals.worker_init.connect(self._join_registry, weak=False)
        signals.worker_ready.connect(self._start_presence, weak=False)
        signals.worker_shutdown.connect(self._leave_registry, weak=False)
        signals.worker_shutdown.connect(self._flush_write_back, weak=False)
        signals.worker_process_shutdown.connect(self._flush_write_back, weak=False)
        signals.beat_init.connect(self._check_at_start, weak=False)
        signals.worker_init.connect(self._serve_metrics, weak=False)
        signals.beat_init.connect(self._serve_metrics, weak=False)
        signals.worker_process_init.connect(self._serve_child_metrics, weak=False)
        control.REVOKERS[app] = self.revoke
        request.WATCHDOG_READERS[app] = lambda header: self.executor.retried_by_watchdog(header)

    @functools.cached_property
    def settings(self) -> Settings:
        """The validated settings (read from the app's config on first use)."""
        return Settings.from_sources(self.app.conf, **self._overrides)

    @functools.cached_property
    def engine(self) -> sa.Engine:
        """The engine of the outbox database."""
        if isinstance(self._engine_arg, sa.Engine):
            return self._engine_arg
        return make_engine(self._engine_arg or self.settings.resolved_database_url())

    @functools.cached_property
    def store(self) -> Store:
        """The store over this outbox's table."""
        store = Store(self.engine, self.settings.table_prefix, self._clock, relaxed=self.settings.relaxed_commits)
        if self.telemetry.on:  # records once the process has an OpenTelemetry SDK set up (see telemetry.py)
            store.on_insert = self.telemetry.on_insert
        return store

    @functools.cached_property
    def reads(self) -> Outbox:
        """This outbox for the operator's reads: on ``outbox_read_database_url`` (a standby) when set, else itself.

        The CLI's read commands, the web page's pages and the metrics' backlog read through
        it; claims, pushes, write-backs and every action stay on the outbox database.
        """
        url = self.settings.read_database_url
        if not url:
            return self
        view = copy.copy(self)
        keep = {"settings", "telemetry", "backoff"}
        cached = {n for n, v in vars(type(self)).items() if isinstance(v, functools.cached_property)}
        view.__dict__ = {k: v for k, v in self.__dict__.items() if k not in cached or k in keep}
        view.__dict__["engine"] = make_engine(url)
        view.__dict__["reads"] = view
        return view

    @functools.cached_property
    def telemetry(self) -> Telemetry:
        """Spans and metrics (OpenTelemetry, when installed and ``outbox_telemetry`` is on)."""
        return Telemetry(self.settings.telemetry)

    @functools.cached_property
    def backoff(self) -> backoff_mod.Backoff:
        """The default retry backoff policy."""
        return backoff_mod.resolve(self.settings)

    @functools.cached_property
    def results(self) -> Results:
        """Writes final states to the app's result backend when no worker request does."""
        return Results(self.app)

    @functools.cached_property
    def settler(self) -> Settler:
        """The one way an attempt ends (retry, failure, cancellation), for the executor and the rescuer."""
        return Settler(
            self.store,
            chained_rows=self.chained_rows,
            report_failure=self.report_failure,
            backoff_for=self.backoff_for,
            backoff_max=self.settings.retry_backoff_max,
            results=self.results,
            telemetry=self.telemetry,
        )

    def backoff_for(self, name: str) -> backoff_mod.Backoff:
        """The retry backoff of the command ``name``: its own, else the outbox's."""
        return getattr(self.app.tasks.get(name), "outbox_backoff", None) or self.backoff

    @functools.cached_property
    def executor(self) -> Executor:
        """Runs commands on the worker."""
        return Executor(
            self.store, self.settings, self.settler, self.chained_rows, self.worker_name, telemetry=self.telemetry
        )

    def worker_name(self) -> str | None:
        """This worker's name in the registry (its Celery nodename), or None outside a registered worker."""
        presence = self.presence
        return presence.name if presence is not None else None

    @functools.cached_property
    def reaper(self) -> Reaper:
        """Returns at once what dead workers ran."""
        return Reaper(self.store, self.settler, self.settings, telemetry=self.telemetry)

    @functools.cached_property
    def jobs(self) -> Jobs:
        """Start, stop, read and list long-running jobs."""

        def insert(conn: Any, rows: list[dict[str, Any]]) -> list[uuid.UUID]:
            return self._with_connection(conn, lambda c: self.store.insert(c, rows, strict=False))

        return Jobs(
            self.store,
            self.settings,
            row_for=self.row_for,
            task=self.task,
            insert=insert,
            cancel=self.cancel,
            engine=self.engine,
        )

    @functools.cached_property
    def monitor(self) -> Monitor:
        """Reads the worker registry."""
        return Monitor(self.store)

    def workers(self, limit: int | None = None, offset: int = 0) -> Page[WorkerInfo]:
        """The registered workers, each with what it runs now; ``limit=None``: all of them."""
        return self.monitor.workers(limit, offset)

    def worker(self, name: str) -> WorkerInfo:
        """One registered worker (by nodename), with what it runs now."""
        return self.monitor.worker(name)

    def limits(self) -> list[LimitState]:
        """The cluster-wide limits in force (settings and commands), each with what is in flight and due under it,
        and whether it holds commands back now."""
        plan = self.relay.plan()
        return self.store.limit_states(plan) if plan.limited else []

    @functools.cached_property
    def relay(self) -> Relay:
        """Publishes due commands."""
        return Relay(self.app, self.store, self.settings, self.results, self.runnable, telemetry=self.telemetry)

    @functools.cached_property
    def rescuer(self) -> Rescuer:
        """Returns commands whose lease lapsed."""
        return Rescuer(
            self.store,
            self.settler,
            self.results,
            telemetry=self.telemetry,
            queue_depth=self.relay.queue_depth,
            dispatch_timeout=self.settings.dispatch_timeout,
        )

    @functools.cached_property
    def scheduler(self) -> Scheduler:
        """Turns due cron schedules into commands."""
        return Scheduler(self.store)

    @functools.cached_property
    def cleaner(self) -> Cleaner:
        """Deletes final rows past their retention."""
        return Cleaner(self.store, self.settings)

    def listening_relay(self, stop: threading.Event | None = None) -> ListeningRelay:
        """A relay loop that wakes when a pushing transaction commits (PostgreSQL), polling as the fallback."""
        return ListeningRelay(self.store, self.settings, self.relay_once, self.rescue_once, stop)

    def create_tables(self) -> None:
        """Create the outbox tables if missing (embedded default and tests; production: ``orch-outbox migrate``)."""
        self.store.create_all()

    def close(self) -> None:
        """Release the outbox's own connections: the relay's broker connection and the store's pool.

        The engine passed in is the caller's and stays open.
        """
        self._leave_registry()  # a worker of this outbox that never saw its shutdown signal
        if "relay" in self.__dict__:
            self.relay.close()
        if "store" in self.__dict__:
            self.store.close()

    def report_failure(
        self, command_id: uuid.UUID, name: str, attempt: int, outcome: str, error: ErrorInfo, *, final: bool
    ) -> None:
        """Tell the error hook and ``command_failed`` receivers about a failed attempt; their errors are logged."""
        info = FailedAttempt(command_id, name, attempt, outcome, error, final)
        hook = self._error_hook
        if hook is not None:
            try:
                hook(info)
            except Exception:
                log.exception("outbox_error_hook %s raised", self.settings.error_hook)
        command_failed.send(sender=self, failure=info)

    @functools.cached_property
    def _error_hook(self) -> Callable[[FailedAttempt], Any] | None:
        path = self.settings.error_hook
        if not path:
            return None
        from celery.utils.imports import symbol_by_name

        try:
            hook = symbol_by_name(path)
        except Exception as exc:
            raise ConfigurationError(f"outbox_error_hook: cannot import {path!r}: {exc}") from None
        if not callable(hook):
            raise ConfigurationError(f"outbox_error_hook: {path!r} is not callable")
        return hook  # type: ignore[no-any-return]

    def relay_once(self) -> int:
        """Dispatch due commands now; returns how many were published."""
        return int(self.relay.run_once())

    def rescue_once(self) -> int:
        """Settle lapsed leases, and return what dead workers ran; returns how many rows changed."""
        return int(self.rescuer.run_once()) + self.reaper.run_once()

    def tick_schedules(self) -> list[dict[str, Any]]:
        """Push the commands of due schedules now (beat does it every ``outbox_schedule_interval``)."""
        return self.scheduler.run_once()

    def cleanup_once(self, budget: float = 5.0) -> int:
        """Delete final rows past their retention, in short batches, for at most ``budget`` seconds."""
        return self.cleaner.run_once(budget)


__all__: Sequence[str] = (
    "BatchInfo",
    "BatchRef",
    "CommandInfo",
    "FailedAttempt",
    "Outbox",
    "ScheduleInfo",
    "command_name",
    "outbox_of",
)
