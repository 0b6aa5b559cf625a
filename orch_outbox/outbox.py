"""The Outbox: one outbox table attached to one Celery app.

``Outbox(app, engine)`` registers the relay and the lease rescuer as tasks, adds them to
the beat schedule, and offers the ``@outbox.command`` decorator, ``push`` and the
calls that read and cancel commands. ``orch_outbox.app`` is a ready-made Celery app
with an Outbox attached; library mode attaches one to an application's own app.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import logging
import math
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from celery import Celery, signals
from celery.canvas import Signature, _chain, _chord, group
from sqlalchemy.orm import Session

from . import backoff as backoff_mod
from . import canvas, celery_meaning, control, request
from .canvas import NOTHING, Plan, Step
from .celery_meaning import MAX_RETRIES
from .clock import Clock
from .errors import (
    BatchNotFound,
    CommandNotFound,
    ConfigurationError,
    InvalidInput,
    InvalidOption,
    OutboxError,
    ScheduleNotFound,
    UnknownCommand,
)
from .executor import Executor
from .jsoncodec import argument_encoder, check_size, encode, encode_arguments, encode_arguments_with_result
from .relay import Relay, Rescuer
from .results import Results
from .running import RUNNING
from .schema import BATCH_STATUSES, FINAL_STATUSES, STATUSES
from .settings import Settings, validate_target
from .settle import Settler
from .signals import command_failed
from .store import ErrorInfo, Store, make_engine
from .task import Hooks, OutboxTask, Outcome, adopt, handler_of
from .uuid7 import uuid7, uuid7_many

log = logging.getLogger("orch_outbox")

RELAY_TASK = "orch_outbox.relay"
RESCUE_TASK = "orch_outbox.rescue"
SCHEDULE_TASK = "orch_outbox.schedules"
CLEANUP_TASK = "orch_outbox.cleanup"
LOCAL_TASKS = frozenset({RELAY_TASK, RESCUE_TASK, SCHEDULE_TASK, CLEANUP_TASK})

PUSH_OPTIONS = frozenset(
    {
        "target",
        "queue",
        "delay",
        "countdown",
        "scheduled_at",
        "eta",
        "expires_at",
        "expires",
        "retries",
        "timeout",
        "priority",
        "unique_key",
        "tenant",
    }
)
MAX_UNIQUE_KEY = 200
#: Longest wait, at worker exit, for the write-back to record the successes it holds.
WRITE_BACK_FLUSH_SECONDS = 10.0
MAX_NAME = 200
MAX_TIMEOUT = 7 * 24 * 3600.0

_BY_APP: weakref.WeakKeyDictionary[Celery, Outbox] = weakref.WeakKeyDictionary()


def outbox_of(app: Celery) -> Outbox:
    """The Outbox attached to a Celery app."""
    try:
        return _BY_APP[app]
    except KeyError:
        raise ConfigurationError(f"no Outbox is attached to the Celery app {app.main!r}") from None


Connectable = Session | sa.Connection | sa.Engine
_T = TypeVar("_T")


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


class Outbox:
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
        if app in _BY_APP:
            raise ConfigurationError(f"the Celery app {app.main!r} already has an Outbox")
        Settings.from_sources({}, env={}, **settings)  # bad overrides fail here, before the app is touched
        self.app = app
        self._engine_arg = engine
        self._clock = clock
        self._overrides = settings
        _BY_APP[app] = self
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
        signals.worker_shutdown.connect(self._flush_write_back, weak=False)
        signals.worker_process_shutdown.connect(self._flush_write_back, weak=False)
        signals.beat_init.connect(self._check_at_start, weak=False)
        control.REVOKERS[app] = self.revoke
        request.WATCHDOG_READERS[app] = lambda header: self.executor.retried_by_watchdog(header)

    # -- configuration ------------------------------------------------------------------

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
        return Store(self.engine, self.settings.table_prefix, self._clock, relaxed=self.settings.relaxed_commits)

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
        )

    def backoff_for(self, name: str) -> backoff_mod.Backoff:
        """The retry backoff of the command ``name``: its own, else the outbox's."""
        return getattr(self.app.tasks.get(name), "outbox_backoff", None) or self.backoff

    @functools.cached_property
    def executor(self) -> Executor:
        """Runs commands on the worker."""
        return Executor(self.store, self.settings, self.settler, self.chained_rows)

    @functools.cached_property
    def relay(self) -> Relay:
        """Publishes due commands."""
        return Relay(self)

    @functools.cached_property
    def rescuer(self) -> Rescuer:
        """Returns commands whose lease lapsed."""
        return Rescuer(self)

    def create_tables(self) -> None:
        """Create the outbox tables if missing (embedded default and tests; production: ``orch-outbox migrate``)."""
        self.store.create_all()

    # -- commands -----------------------------------------------------------------------

    def command(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        target: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        priority: int = 0,
        backoff: Callable[[int, str], float] | None = None,
        hide_input: bool = False,
        **celery_options: Any,
    ) -> Any:
        """Declare a command: ``@outbox.command(target="email-worker", timeout=120, retries=5)``.

        The name is ``name``, or the function's name by convention (a ``Command``
        suffix is dropped and CamelCase becomes snake_case). Other keyword arguments
        are Celery task options (``rate_limit``, ``time_limit``, ...). ``hide_input``
        keeps the arguments out of the broker message, worker logs and Flower (they stay
        in the outbox row, where the handler reads them).
        """
        if target is not None:
            validate_target(target)
        _check_timeout(timeout)
        _check_retries(retries)
        _check_priority(priority)

        def decorate(func: Callable[..., Any]) -> Any:
            return self.app.task(
                func,
                base=OutboxTask,
                name=check_command_name(name if name is not None else command_name(func.__name__)),
                shared=False,
                outbox_target=target,
                outbox_timeout=timeout,
                outbox_retries=retries,
                outbox_priority=priority,
                outbox_backoff=staticmethod(backoff) if backoff else None,
                outbox_hooks=Hooks(),
                outbox_hide_input=hide_input,
                **celery_options,
            )

        return decorate(fn) if fn is not None else decorate

    def task(self, name: str) -> OutboxTask:
        """The registered command of that name."""
        task = self.app.tasks.get(name)
        if task is None or not isinstance(task, OutboxTask):
            raise UnknownCommand(f"no outbox command is registered as {name!r}")
        return task

    # -- push ---------------------------------------------------------------------------

    def push(self, conn: Connectable, call: Signature, *, tenant: str | None = None) -> uuid.UUID:
        """Insert a command, a Celery task signature or a canvas, in the caller's transaction.

        A signature (of an outbox command or of a plain Celery task) is one command;
        returns its id. A ``chain`` returns the id of its first command (the next ones
        are inserted as each completes: follow them with :meth:`children`); a ``group``
        or ``chord`` returns its batch's id (see :meth:`batch`). See ``canvas.py``.
        """
        if not isinstance(call, (_chain, _chord, group)):
            row = self.row_for(call)
            if tenant is not None:
                row["tenant"] = _tenant(tenant)
            return self._insert(conn, [row])[0]
        plan = canvas.next_in_chain(self.steps_for(call), NOTHING, None, _tenant(tenant))
        ids = self._insert(conn, plan)
        return plan.batches[0]["id"] if plan.batches else ids[0]

    def push_many(self, conn: Connectable, calls: Iterable[Signature]) -> list[uuid.UUID]:
        """Insert many commands at once in the caller's transaction (COPY on PostgreSQL from 50 rows).

        A call that cannot be pushed raises :class:`InvalidInput` (or the like) and
        nothing of the push stays written: the calls are checked before anything is
        written or, in a COPY large enough to be written while the calls are checked,
        what it wrote is undone (a savepoint). Either way the caller's transaction stays
        usable.
        """
        calls = list(calls)
        templates, items = self._templated_rows(calls)
        return self._with_connection(conn, lambda c: self.store.insert_templated(c, items, len(calls), templates))

    def _templated_rows(
        self, calls: list[Signature]
    ) -> tuple[list[dict[str, Any]], Iterator[tuple[dict[str, Any], uuid.UUID, Any]]]:
        """The distinct template rows of a bulk push, and (template row, id, input) per call, lazily.

        Calls of one command with the same options share a template (target, timeout,
        retries, priority, times): the first call of each is validated in full here; the
        others' arguments are bound, encoded and size-checked as the items are taken, so a
        COPY can write while they are (the rows themselves are never built for a COPY).
        """
        done: dict[Any, tuple[dict[str, Any], Any]] = {}
        templates: list[dict[str, Any]] = []
        plan: list[tuple[dict[str, Any], Any]] = []  # (template, its encoder; None: the row is the call's own)
        ids = uuid7_many(len(calls))  # ids in push order, drawn for the whole push at once
        for call, command_id in zip(calls, ids, strict=True):
            key = _template_key(call)
            known = done.get(key) if key is not None else None
            if known is None:
                row = self.row_for(call)
                row["id"] = command_id
                templates.append(row)
                if key is not None:
                    done[key] = (row, argument_encoder(handler_of(self.runnable(call.task)).signature))
                known = (row, None)
            plan.append(known)
        return templates, self._encoded(calls, ids, plan)

    def _encoded(
        self, calls: list[Signature], ids: list[uuid.UUID], plan: list[tuple[dict[str, Any], Any]]
    ) -> Iterator[tuple[dict[str, Any], uuid.UUID, Any]]:
        limit = self.settings.max_input_bytes
        for call, command_id, (template, encode_call) in zip(calls, ids, plan, strict=True):
            if encode_call is None:
                yield template, command_id, template["input"]
                continue
            data = encode_call(tuple(call["args"]), call["kwargs"])
            data.text = check_size(data, limit, f"input of {template['name']}")
            yield template, command_id, data

    def push_batch(
        self,
        conn: Connectable,
        calls: Iterable[Signature],
        *,
        tenant: str | None = None,
        then: Signature | None = None,
    ) -> BatchRef:
        """Insert commands as one batch, in the caller's transaction.

        ``then``: the continuation, a signature inserted exactly once when every member
        has reached a final state (unless the batch is canceled). Its first argument is
        the list of the members' outcomes, in push order: ``{"id", "name", "status",
        "output", "error"}`` each. Members can be added while the batch is open
        (:meth:`append_to_batch`).
        """
        members = [self.row_for(call) for call in calls]
        continuation = self._call_step(then, pass_result=True) if then is not None else None
        plan = canvas.batch_plan(members, tenant=_tenant(tenant), continuation=continuation, chord=False)
        ids = self._insert(conn, plan)
        batch = plan.batches[0]
        return BatchRef(batch["id"], ids, batch["continuation_id"])

    def append_to_batch(
        self, conn: Connectable, batch_id: uuid.UUID | str, calls: Iterable[Signature]
    ) -> list[uuid.UUID]:
        """Add members to an open batch in the caller's transaction; :class:`BatchClosed` once it finished."""
        rows = [self.row_for(call) for call in calls]
        bid = _as_uuid(batch_id, BatchNotFound)
        return self._with_connection(conn, lambda c: self.store.append(c, bid, rows))

    def _insert(self, conn: Connectable, rows: list[dict[str, Any]] | Plan) -> list[uuid.UUID]:
        return self._with_connection(conn, lambda c: self.store.insert(c, rows))

    def _with_connection(self, conn: Connectable, work: Callable[[sa.Connection], _T]) -> _T:
        if isinstance(conn, Session):
            return work(conn.connection())
        if isinstance(conn, sa.Connection):
            return work(conn)
        if isinstance(conn, sa.Engine):
            with conn.begin() as own:
                return work(own)
        raise TypeError(f"push needs a SQLAlchemy Session, Connection or Engine, not {type(conn).__name__}")

    # -- canvases -----------------------------------------------------------------------

    def steps_for(self, call: Signature, pass_result: bool = False) -> list[Step]:
        """A Celery canvas as durable chain steps (see ``canvas.py``); raises on shapes it cannot keep."""
        if isinstance(call, _chain):
            steps: list[Step] = []
            for i, task in enumerate(call.tasks):
                steps.extend(self.steps_for(task, pass_result if i == 0 else True))
            for before, after in itertools.pairwise(steps):
                if before["kind"] == "group" and before["then"] is None and after["kind"] == "group":
                    raise InvalidInput("a group directly followed by another group cannot be kept durably")
            if not steps:
                raise InvalidInput("an empty chain has nothing to push")
            return steps
        if isinstance(call, _chord):
            members = [self._call_step(m, pass_result) for m in call.tasks]
            body = self.steps_for(call.body, True)
            if body[0]["kind"] != "call":
                raise InvalidInput("a chord's body must start with a task signature, not a group")
            then = {**body[0], "chain": body[1:]}
            return [canvas.group_step(members, then, chord=True)]
        if isinstance(call, group):
            return [canvas.group_step([self._call_step(m, pass_result) for m in call.tasks], None, chord=False)]
        return [self._call_step(call, pass_result)]

    def _call_step(self, call: Signature, pass_result: bool) -> Step:
        if isinstance(call, (_chain, _chord, group)):
            raise InvalidInput(
                f"a group member or a continuation must be a single task signature, not a {type(call).__name__}"
            )
        row = self.row_for(call, leading_result=pass_result)
        return canvas.step_from_row(row, row.pop("pass_as", None))

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse unknown push options early, with the list of known ones."""
        unknown = sorted(set(options) - PUSH_OPTIONS)
        if unknown:
            raise InvalidOption(f"unknown push option(s) {unknown}; known: {sorted(PUSH_OPTIONS)}")

    def runnable(self, name: str) -> Any:
        """The task a row of that name runs: an outbox command, or a plain Celery task of this app.

        Celery's own tasks (``celery.*``) and the outbox's services never run from a row;
        plain tasks only while ``outbox_plain_tasks`` is on.
        """
        task = self.app.tasks.get(name)
        if isinstance(task, OutboxTask):
            return task
        if task is None or name.startswith(("celery.", "orch_outbox.")) or not self.settings.plain_tasks:
            raise UnknownCommand(f"no outbox command is registered as {name!r}")
        return task

    def row_for(
        self, call: Signature, parent_id: uuid.UUID | None = None, leading_result: bool = False
    ) -> dict[str, Any]:
        """The row a signature becomes, validated; raises before anything is written.

        ``leading_result``: the first argument is left out, to receive the previous
        step's result later (unless the signature is immutable, ``.si()``); the row's
        ``pass_as`` names the parameter that receives it.
        """
        if not isinstance(call, Signature):
            raise TypeError(f"expected a command signature such as send_email.s(...), got {type(call).__name__}")
        task = self.runnable(call.task)
        plain = not isinstance(task, OutboxTask)
        options = dict(call.options)
        if plain:  # Celery fills some options in by itself; only the outbox's own count here
            options = {k: v for k, v in options.items() if k in PUSH_OPTIONS}
        self.check_options(options)
        settings = self.settings
        handler = handler_of(task)
        pass_as = None
        if leading_result and not call.immutable:
            data, pass_as = encode_arguments_with_result(handler.signature, tuple(call.args), dict(call.kwargs))
        else:
            data = encode_arguments(handler.signature, tuple(call.args), dict(call.kwargs))
        check_size(data, settings.max_input_bytes, f"input of {task.name}")
        target = options.get("target", options.get("queue"))
        if target is None and not plain:
            target = task.outbox_target or settings.default_target or None
        if target is None:  # as Celery routes it: task_routes, the task's queue, task_default_queue
            target = celery_meaning.routed_queue(self.app, task, tuple(call.args), dict(call.kwargs))
        try:
            target = validate_target(target)
        except ConfigurationError as exc:
            raise InvalidOption(str(exc)) from None
        if plain:  # a plain task keeps its Celery time limits and max_retries (see celery_meaning.py)
            own_timeout, own_retries = celery_meaning.plain_timeout(self.app, task), celery_meaning.plain_retries(task)
        else:
            own_timeout, own_retries = task.outbox_timeout, task.outbox_retries
        timeout = _pick(options.get("timeout"), own_timeout, settings.default_timeout)
        retries = _pick(options.get("retries"), own_retries, settings.default_retries)
        priority = _pick(options.get("priority"), getattr(task, "outbox_priority", None), 0)
        _check_timeout(timeout)
        _check_retries(retries)
        _check_priority(priority)
        row = {
            "id": uuid7(),
            "name": task.name,
            "target": target,
            "input": data,
            "retries": retries,
            "retries_left": retries,
            "timeout": float(timeout),
            "priority": priority,
            "parent_id": parent_id,
            "delay": _delay(options),
            "scheduled_at": _aware(options.get("scheduled_at", options.get("eta")), "scheduled_at"),
            **_expiry(options),
            "unique_key": _unique_key(options.get("unique_key")),
            "tenant": _tenant(options.get("tenant")),
        }
        if pass_as is not None:
            row["pass_as"] = pass_as
        return row

    def chained_rows(self, name: str, kind: str, outcome: Outcome) -> list[dict[str, Any]]:
        """Rows for the commands a finished command's hooks of ``kind`` return (plain tasks have none)."""
        task = self.app.tasks.get(name)
        if not isinstance(task, OutboxTask):
            return []
        rows = []
        for hook in getattr(task.outbox_hooks, kind):
            for call in hook(outcome) or ():
                rows.append(self.row_for(call, parent_id=outcome.id))
        return rows

    # -- reading and cancelling ---------------------------------------------------------

    def get(self, command_id: uuid.UUID | str) -> CommandInfo:
        """A command's state, output, error and attempts; raises CommandNotFound."""
        row = self.store.get(_as_uuid(command_id))
        if row is None:
            raise CommandNotFound(f"no command with id {command_id}")
        return CommandInfo.from_row(row)

    def children(self, command_id: uuid.UUID | str) -> list[CommandInfo]:
        """The commands chained from one command."""
        return [CommandInfo.from_row(r) for r in self.store.children(_as_uuid(command_id))]

    def cancel(self, command_id: uuid.UUID | str) -> bool:
        """Cancel a command that is not final; returns False when it already was.

        Pending or dispatched: ``canceled`` at once, its on-cancel commands enqueued in
        the same transaction. Running: the cancellation is recorded and the workers are
        told (a broadcast); the handler is interrupted with :class:`CommandCanceled`
        (threads and solo pools: in its thread; prefork: by signal) or learns it at its
        next ``current().heartbeat()``; its worker then records ``canceled`` and the
        on-cancel commands. A handler that returns before it learns it is ``completed``.
        """
        return self._cancel(_as_uuid(command_id)) is not None

    def _cancel(self, cid: uuid.UUID) -> str | None:
        """Cancel one command; the status it had, or None if it was final (or is unknown)."""
        names: list[str] = []

        def children_for(name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
            names.append(name)
            try:
                return self.chained_rows(name, "if_canceled", Outcome(cid, name, data))
            except Exception:  # as in settle.py: a raising hook costs its commands, never the cancellation
                log.exception("if_canceled hook of %s raised; canceling %s without its commands", name, cid)
                return []

        was = self.store.cancel(cid, children_for)
        if was is None:
            return None
        status, attempt = was
        if status == "running":
            self.tell_workers_to_cancel(f"{cid}:{attempt}")
        else:  # final now, and no worker request will say so: the result backend learns it here
            self.results.revoked(cid, names[0] if names else "", "canceled")
        return status

    def revoke(self, task_ids: Iterable[str]) -> tuple[set[str], set[str]]:
        """Celery's revoke of these task ids, for the ones that are commands (see ``control.py``).

        Returns (the ids that are commands of this outbox, the ones canceled before they ran).
        """
        commands: set[str] = set()
        before_run: set[str] = set()
        for task_id in task_ids:
            try:
                cid = uuid.UUID(str(task_id))
            except ValueError:
                continue
            status = self._cancel(cid)
            if status is None and self.store.get(cid) is None:
                continue
            commands.add(task_id)
            if status in ("pending", "dispatched"):
                before_run.add(task_id)
        return commands, before_run

    def tell_workers_to_cancel(self, task_id: str) -> None:
        """Broadcast a cancel of one running attempt; a failure is logged (heartbeats still tell the handler)."""
        try:
            self.app.control.broadcast(control.CANCEL_CONTROL, arguments={"task_id": task_id})
        except Exception as exc:  # the request is in the database; the broadcast only makes it prompt
            log.warning("could not broadcast the cancellation of %s: %s", task_id, exc)

    def close(self) -> None:
        """Release the outbox's own connections: the relay's broker connection and the store's pool.

        The engine passed in is the caller's and stays open.
        """
        if "relay" in self.__dict__:
            self.relay.close()
        if "store" in self.__dict__:
            self.store.close()

    # -- batches and tenants ------------------------------------------------------------

    def batch(self, batch_id: uuid.UUID | str) -> BatchInfo:
        """A batch's state and its members' counts by state; raises :class:`BatchNotFound`."""
        row = self.store.batch_stats(_as_uuid(batch_id, BatchNotFound))
        if row is None:
            raise BatchNotFound(f"no batch with id {batch_id}")
        return _batch_info(row)

    def batches(
        self, *, tenant: str | None = None, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[BatchInfo]:
        """Batches, newest first, with their progress."""
        _check_page(limit, offset)
        if status is not None and status not in BATCH_STATUSES:
            raise InvalidOption(f"batch status must be one of {BATCH_STATUSES}, got {status!r}")
        rows = self.store.list_batches(tenant, status, limit, offset)
        return [_batch_info(self.store.batch_stats(r["id"]) or r) for r in rows]

    def batch_members(self, batch_id: uuid.UUID | str, limit: int = 1000, offset: int = 0) -> list[CommandInfo]:
        """A batch's members, newest first."""
        _check_page(limit, offset)
        bid = _as_uuid(batch_id, BatchNotFound)
        if self.store.batch_stats(bid) is None:
            raise BatchNotFound(f"no batch with id {batch_id}")
        rows = self.store.find(limit=limit, offset=offset, batch_id=bid)
        return [CommandInfo.from_row(r) for r in rows]

    def cancel_batch(self, batch_id: uuid.UUID | str) -> int:
        """Cancel a batch: pending members now, running ones told to stop; its continuation never runs.

        Returns how many members were canceled or asked to stop (0 if the batch was final).
        """
        bid = _as_uuid(batch_id, BatchNotFound)

        def children_for(cid: uuid.UUID, name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
            return self.chained_rows(name, "if_canceled", Outcome(cid, name, data))

        _, canceled, running = self.store.cancel_batch(bid, children_for)
        for command_id, attempt in running:
            self.tell_workers_to_cancel(f"{command_id}:{attempt}")
        return canceled + len(running)

    def tenant_stats(self, tenant: str) -> dict[str, Any]:
        """A tenant's commands and batches counted by state, and the mean run time of its completed commands."""
        return dict(self.store.tenant_stats(_tenant(tenant) or ""))

    # -- pause and resume ---------------------------------------------------------------

    def pause(self, *, target: str | None = None, tenant: str | None = None) -> bool:
        """Hold back every command, one target's, or one tenant's; False if that pause was in force.

        Paused commands stay pending; running ones finish. A message already in the
        broker goes back to pending when a worker receives it, unstarted: once this
        returns, no command of that scope starts until :meth:`resume`.
        """
        return self.store.pause(*_scope(target, tenant))

    def resume(self, *, target: str | None = None, tenant: str | None = None) -> bool:
        """Lift a pause made with the same arguments; False if there was none."""
        return self.store.resume(*_scope(target, tenant))

    def paused(self) -> list[dict[str, Any]]:
        """The pauses in force: ``{"scope": "all"|"target"|"tenant", "value", "paused_at"}``."""
        return [dict(r) for r in self.store.paused()]

    # -- dead letter and retention ------------------------------------------------------

    def find(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        target: str | None = None,
        tenant: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[CommandInfo]:
        """Commands matching the filters, newest first (``status="failed"``: the dead letters)."""
        _check_page(limit, offset)
        if status is not None and status not in STATUSES:
            raise InvalidOption(f"status must be one of {STATUSES}, got {status!r}")
        rows = self.store.find(limit, offset, status=status, name=name, target=target, tenant=tenant)
        return [CommandInfo.from_row(r) for r in rows]

    def failed(self, **filters: Any) -> list[CommandInfo]:
        """Failed commands (the dead letters) with their errors, newest first; filters as :meth:`find`."""
        return self.find(status="failed", **filters)

    def requeue(
        self,
        ids: Iterable[uuid.UUID | str] | None = None,
        *,
        name: str | None = None,
        target: str | None = None,
        tenant: str | None = None,
        all: bool = False,
    ) -> int:
        """Put failed commands back to pending, due now, with fresh retries; returns how many.

        Name ids, or filters, or ``all=True``; nothing at all is refused (so a typo
        cannot re-queue every dead letter).
        """
        id_list = _selection("requeue", ids, name, target, tenant, all)
        return self.store.requeue(ids=id_list, name=name, target=target, tenant=tenant)

    def purge(
        self,
        ids: Iterable[uuid.UUID | str] | None = None,
        *,
        status: str = "failed",
        name: str | None = None,
        target: str | None = None,
        tenant: str | None = None,
        all: bool = False,
    ) -> int:
        """Delete final commands (failed by default); returns how many. Needs ids, a filter or ``all=True``.

        Members of a batch that is still open are kept: its continuation will read them.
        """
        id_list = _selection("purge", ids, name, target, tenant, all)
        if status not in FINAL_STATUSES:
            raise InvalidOption(f"only final commands can be purged: status must be one of {FINAL_STATUSES}")
        return self.store.purge(status=status, ids=id_list, name=name, target=target, tenant=tenant)

    def cleanup_once(self, budget: float = 5.0) -> int:
        """Delete final rows past their retention, in short batches, for at most ``budget`` seconds."""
        settings = self.settings
        deadline = time.monotonic() + budget
        deleted = 0
        plans = [(("completed", "canceled", "expired"), settings.retention), (("failed",), settings.failed_retention)]
        for statuses, keep in plans:
            if keep <= 0:
                continue
            while time.monotonic() < deadline:
                n = self.store.delete_finished(statuses, keep, settings.cleanup_batch)
                deleted += n
                if n < settings.cleanup_batch:
                    break
        if deleted:
            log.info("cleanup: deleted %d row(s) past their retention", deleted)
        return deleted

    # -- schedules ----------------------------------------------------------------------

    def put_schedule(
        self,
        name: str,
        call: Signature,
        cron: str,
        *,
        timezone: str = "UTC",
        enabled: bool = True,
        unique: bool = False,
        tenant: str | None = None,
    ) -> ScheduleInfo:
        """Create or replace the schedule ``name``: ``call`` is pushed at every tick of ``cron``.

        ``cron`` has five fields (minute hour day-of-month month day-of-week) with
        Celery's ``crontab`` semantics, read in ``timezone``. ``unique``: a tick is
        skipped while the command of the previous tick is not final. Each tick becomes
        one command even with several beats; after downtime, the missed ticks become one
        command and the schedule goes on from the next tick.
        """
        from . import cron as cron_mod

        name = _schedule_name(name)
        cron_mod.parse(cron)
        cron_mod.zone(timezone)
        if isinstance(call, (_chain, _chord, group)):
            raise InvalidInput("a schedule pushes a single task signature")
        row = self.row_for(call)
        for key in ("scheduled_at", "expires_at", "unique_key", "delay"):
            if row.get(key) is not None or row.get("expires") is not None:
                raise InvalidOption(f"a scheduled signature cannot carry {key}: each tick is due when it fires")
        now = self.store.now()
        self.store.put_schedule(
            {
                "name": name,
                "command": row["name"],
                "input": row["input"],
                "cron": cron,
                "timezone": timezone,
                "target": row["target"],
                "tenant": _tenant(tenant) if tenant is not None else row.get("tenant"),
                "priority": row["priority"],
                "retries": row["retries"],
                "timeout": row["timeout"],
                "enabled": bool(enabled),
                "is_unique": bool(unique),
                "next_run_at": cron_mod.next_fire(cron, timezone, now),
            }
        )
        return self.schedule(name)

    def schedule(self, name: str) -> ScheduleInfo:
        """One schedule; raises :class:`ScheduleNotFound`."""
        row = self.store.get_schedule(name)
        if row is None:
            raise ScheduleNotFound(f"no schedule named {name!r}")
        return ScheduleInfo.from_row(row)

    def schedules(self) -> list[ScheduleInfo]:
        """Every schedule, by name."""
        return [ScheduleInfo.from_row(r) for r in self.store.list_schedules()]

    def delete_schedule(self, name: str) -> bool:
        """Delete a schedule; False if there was none. Commands it already pushed are kept."""
        return self.store.delete_schedule(name)

    def enable_schedule(self, name: str, enabled: bool = True) -> ScheduleInfo:
        """Switch a schedule on or off; switching on counts from now (no catch-up of the time it was off)."""
        from . import cron as cron_mod

        current = self.schedule(name)
        values: dict[str, Any] = {"enabled": bool(enabled)}
        if enabled and not current.enabled:
            values["next_run_at"] = cron_mod.next_fire(current.cron, current.timezone, self.store.now())
        self.store.set_schedule(name, **values)
        return self.schedule(name)

    def tick_schedules(self) -> list[dict[str, Any]]:
        """Push the commands of due schedules now (beat does it every ``outbox_schedule_interval``)."""
        from . import cron as cron_mod

        def next_fire(row: Any, now: dt.datetime) -> dt.datetime:
            return cron_mod.next_fire(row["cron"], row["timezone"], now)

        return [dict(r) for r in self.store.tick_schedules(next_fire)]

    # -- error hook ---------------------------------------------------------------------

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
        """Settle lapsed leases now; returns how many rows changed."""
        return int(self.rescuer.run_once())

    # -- wiring -------------------------------------------------------------------------

    def _register_service_tasks(self) -> None:
        outbox = self

        @self.app.task(name=RELAY_TASK, ignore_result=True, shared=False)
        def relay() -> int:
            return outbox.relay_once()

        @self.app.task(name=RESCUE_TASK, ignore_result=True, shared=False)
        def rescue() -> int:
            return outbox.rescue_once()

        @self.app.task(name=SCHEDULE_TASK, ignore_result=True, shared=False)
        def schedules() -> int:
            return len(outbox.tick_schedules())

        @self.app.task(name=CLEANUP_TASK, ignore_result=True, shared=False)
        def cleanup() -> int:
            return outbox.cleanup_once()

    def _add_beat_entries(self, sender: Celery | None = None, **_: Any) -> None:
        settings = self.settings
        schedule = self.app.conf.beat_schedule
        schedule.setdefault("orch-outbox-relay", {"task": RELAY_TASK, "schedule": settings.poll_interval})
        schedule.setdefault("orch-outbox-rescue", {"task": RESCUE_TASK, "schedule": settings.rescue_interval})
        schedule.setdefault("orch-outbox-schedules", {"task": SCHEDULE_TASK, "schedule": settings.schedule_interval})
        schedule.setdefault("orch-outbox-cleanup", {"task": CLEANUP_TASK, "schedule": settings.cleanup_interval})
        accepted = {str(c) for c in (self.app.conf.accept_content or ())}
        unsafe = sorted(accepted - {"json", "application/json"})
        if unsafe:
            # Commands are always published as JSON; a worker that also accepts pickle can be
            # made to run code by anyone able to write to the broker.
            log.warning(
                "app %r accepts %s besides JSON; set accept_content = ['json'] so workers refuse other payloads",
                self.app.main,
                unsafe,
            )

    def _check_at_start(self, sender: Any = None, **_: Any) -> None:
        """A worker or beat of this app refuses to start on invalid settings.

        SystemExit, because Celery logs and swallows ordinary exceptions of signal handlers.
        """
        if getattr(sender, "app", None) is not self.app:
            return
        try:
            self.settings  # noqa: B018 - reading validates
        except ConfigurationError as exc:
            raise SystemExit(f"orch_outbox: invalid settings: {exc}") from None

    def _adopt_plain_tasks(self, sender: Any = None, **_: Any) -> None:
        """At worker start: let this app's plain Celery tasks run outbox rows (see ``task.adopt``)."""
        if getattr(sender, "app", None) is not self.app or not self.settings.plain_tasks:
            return
        self.adopt_plain_tasks()

    def adopt_plain_tasks(self) -> int:
        """Wrap the plain Celery tasks of this app so that rows naming them run fenced; returns how many."""
        adopted = 0
        for name, task in list(self.app.tasks.items()):
            if name.startswith(("celery.", "orch_outbox.")):
                continue
            adopted += adopt(task, lambda t, request: self.executor.execute(t, request))
        return adopted

    def _start_write_back(self, sender: Any = None, **_: Any) -> None:
        """In a worker of this app: plain successes are written behind the handlers (see ``_WriteBack``).

        Every pool gains: a prefork or solo process takes its next message without waiting
        for the last one's WAL flush; the threads of a threads pool share flushes.
        """
        if getattr(sender, "app", None) is self.app:
            self.executor.start_write_back()

    def _flush_write_back(self, sender: Any = None, **_: Any) -> None:
        """Before a worker (or a prefork child) exits: write back the successes still held."""
        executor = self.__dict__.get("executor")
        if executor is not None and not executor.flush(WRITE_BACK_FLUSH_SECONDS):
            log.warning("exiting with completions not yet written; their attempts will be retried")

    def _after_fork(self, **_: Any) -> None:
        """In a prefork child: never reuse database connections opened by the parent; arm the watchdog."""
        RUNNING.in_pool_child = True
        engine = self.__dict__.get("engine")
        if engine is not None:  # the store's autocommit engine shares this pool
            engine.dispose(close=False)
        store = self.__dict__.get("store")
        if store is not None:
            store.after_fork()

    def _on_task_unknown(self, sender: Any = None, message: Any = None, name: str = "", id: str = "", **_: Any) -> None:
        header = (getattr(message, "headers", None) or {}).get("outbox")
        if sender is not None and getattr(sender, "app", None) is not self.app:
            return
        if header:
            self.executor.record_not_found(header, name)


@dataclass(frozen=True)
class FailedAttempt:
    """What the error hook receives: one attempt that did not succeed."""

    id: uuid.UUID
    name: str
    attempt: int
    outcome: str
    error: ErrorInfo
    final: bool  # True: the command is now failed; False: it will be retried


MAX_PAGE = 10_000


def _batch_info(row: Any) -> BatchInfo:
    fields = BatchInfo.__dataclass_fields__
    values = {k: row.get(k) for k in fields}
    values["counts"] = values["counts"] or {}
    return BatchInfo(**values)


def _check_page(limit: Any, offset: Any) -> None:
    for what, value, low in (("limit", limit, 1), ("offset", offset, 0)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not low <= value <= (MAX_PAGE if what == "limit" else 2**62)
        ):
            raise InvalidOption(
                f"{what} must be an integer >= {low}" + (f" and <= {MAX_PAGE}" if what == "limit" else "")
            )


def _scope(target: str | None, tenant: str | None) -> tuple[str, str]:
    if target is not None and tenant is not None:
        raise InvalidOption("pause one target or one tenant at a time, not both")
    if target is not None:
        try:
            return "target", validate_target(target)
        except ConfigurationError as exc:
            raise InvalidOption(str(exc)) from None
    if tenant is not None:
        return "tenant", _tenant(tenant) or ""
    return "all", ""


def _selection(
    verb: str, ids: Iterable[uuid.UUID | str] | None, name: Any, target: Any, tenant: Any, everything: bool
) -> list[uuid.UUID] | None:
    """The ids of a requeue or purge; refuses a call that names nothing (a typo must not select every row)."""
    id_list = None if ids is None else [_as_uuid(i) for i in ids]
    if id_list is None and name is None and target is None and tenant is None and not everything:
        raise InvalidOption(f"{verb} needs ids, a filter (name, target, tenant) or all=True")
    return id_list


def _schedule_name(value: Any) -> str:
    return _text(value, "a schedule name", MAX_NAME)


def command_name(func_name: str) -> str:
    """``SendEmailCommand`` / ``send_email`` → ``send_email``."""
    base = func_name[: -len("Command")] if func_name.endswith("Command") and func_name != "Command" else func_name
    out = []
    for i, ch in enumerate(base):
        if ch.isupper() and i and (base[i - 1].islower() or (i + 1 < len(base) and base[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out).replace("__", "_")


def _template_key(call: Any) -> Any:
    """What makes two signatures' rows equal but for their arguments (None: do not share)."""
    if type(call) is not Signature or call.get("immutable"):
        return None
    try:  # the signature's own dict: its properties cost more than the rest of a bulk row
        key = (call["task"], tuple(sorted(call["options"].items())))
        hash(key)
    except TypeError:
        return None
    return key


def _pick(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _as_uuid(value: uuid.UUID | str, missing: type[OutboxError] = CommandNotFound) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise missing(f"{value!r} is not an id") from None


def _tenant(value: Any) -> str | None:
    return None if value is None else _text(value, "tenant", MAX_NAME)


def _unique_key(value: Any) -> str | None:
    return None if value is None else _text(value, "unique_key", MAX_UNIQUE_KEY)


def _text(value: Any, what: str, limit: int, error: type[OutboxError] = InvalidOption) -> str:
    """A name or key stored as text: 1..``limit`` characters, no NUL, valid Unicode; else ``error``."""
    if not isinstance(value, str) or not 1 <= len(value) <= limit or not _storable_text(value):
        raise error(f"{what} must be valid text of 1..{limit} characters without NUL, got {value!r}")
    return value


def _storable_text(value: str) -> bool:
    """No NUL (PostgreSQL text refuses it) and valid Unicode (no lone surrogates)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_command_name(name: Any) -> str:
    """A command name must fit its column and be plain text; refused before anything is written."""
    return _text(name, "a command name", MAX_NAME, ConfigurationError)


def _check_timeout(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidOption(f"timeout must be a number of seconds, got {value!r}")
    if not 0 < value <= MAX_TIMEOUT:
        raise InvalidOption(f"timeout must be > 0 and <= {MAX_TIMEOUT:g} seconds, got {value!r}")


def _check_retries(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise InvalidOption(f"retries must be an integer in 0..{MAX_RETRIES}, got {value!r}")


def _check_priority(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise InvalidOption(f"priority must be an integer in 0..255, got {value!r}")


#: Longest delay or expiry accepted at push (ten years), so a due time always fits a timestamp.
MAX_DELAY = 10 * 365 * 24 * 3600.0


def _seconds(value: Any, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= MAX_DELAY
    ):
        raise InvalidOption(f"{what} must be a number of seconds in 0..{MAX_DELAY:.0f} (ten years), got {value!r}")
    return float(value)


def _delay(options: dict[str, Any]) -> float | None:
    value = options.get("delay", options.get("countdown"))
    return None if value is None else _seconds(value, "delay")


def _aware(value: Any, what: str) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        raise InvalidOption(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} is a naive datetime; pass a timezone-aware one")
    return value


def _expiry(options: dict[str, Any]) -> dict[str, Any]:
    """``expires_at`` (an aware datetime) or ``expires`` (seconds after the push, stamped with the push's time)."""
    value = options.get("expires_at", options.get("expires"))
    if value is None or isinstance(value, dt.datetime):
        return {"expires_at": _aware(value, "expires_at")}
    return {"expires_at": None, "expires": _seconds(value, "expires")}


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
