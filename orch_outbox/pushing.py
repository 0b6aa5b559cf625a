"""Declaring and pushing commands: signatures and canvases become validated rows in the caller's transaction."""

from __future__ import annotations

import functools
import itertools
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import sqlalchemy as sa
from celery.canvas import Signature, _chain, _chord, group
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from . import canvas, celery_meaning
from .canvas import NOTHING, Plan, Step
from .connections import Connections
from .errors import (
    BatchNotFound,
    ConfigurationError,
    InvalidInput,
    InvalidOption,
    TablesMissing,
    UnknownCommand,
)
from .flow import make_limit
from .jsoncodec import argument_encoder, check_size, encode_arguments, encode_arguments_with_result
from .models import BatchRef
from .parts import OutboxParts
from .settings import validate_target
from .task import Hooks, OutboxTask, Outcome, handler_of
from .uuid7 import uuid7, uuid7_many
from .validation import (
    PUSH_OPTIONS,
    _as_uuid,
    _aware,
    _check_priority,
    _check_retries,
    _check_timeout,
    _delay,
    _expiry,
    _pick,
    _template_key,
    _tenant,
    _unique_key,
    check_command_name,
    command_name,
)

log = logging.getLogger("orch_outbox")


Connectable = Session | sa.Connection | sa.Engine
AsyncConnectable = AsyncSession | AsyncConnection | AsyncEngine


async def _on_async(conn: AsyncConnectable, work: Callable[[sa.Connection], _T]) -> _T:
    """Run ``work`` on the synchronous face of an asyncio session, connection or engine (SQLAlchemy's ``run_sync``)."""
    if isinstance(conn, AsyncSession):
        return await conn.run_sync(lambda session: work(session.connection()))
    if isinstance(conn, AsyncConnection):
        return await conn.run_sync(work)
    if isinstance(conn, AsyncEngine):
        async with conn.begin() as own:
            return await own.run_sync(work)
    raise TypeError(f"push_async needs an AsyncSession, AsyncConnection or AsyncEngine, not {type(conn).__name__}")


_T = TypeVar("_T")

#: Options of a Celery signature naming what runs after it, or its id: refused on a plain task's push (a command
#: refuses every option that is not a push option).
_AFTER_OPTIONS = ("link", "link_error", "chain", "chord", "task_id")


class Pushing(OutboxParts):
    """Declaring and pushing commands: signatures and canvases become validated rows in the caller's transaction."""

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
        concurrency: int | None = None,
        rate: str | None = None,
        **celery_options: Any,
    ) -> Any:
        """Declare a command: ``@outbox.command(target="email-worker", timeout=120, retries=5)``.

        The name is ``name``, or the function's name by convention (a ``Command``
        suffix is dropped and CamelCase becomes snake_case). Other keyword arguments
        are Celery task options (``rate_limit``, ``time_limit``, ...). ``hide_input``
        keeps the arguments out of the broker message, worker logs and Flower (they stay
        in the outbox row, where the handler reads them). ``concurrency`` and ``rate``
        (``"100/m"``) are cluster-wide limits of this command, kept by the claim (see
        ``flow.py``); ``outbox_limits["command:NAME"]`` in the settings wins over them.
        """
        if target is not None:
            validate_target(target)
        _check_timeout(timeout)
        _check_retries(retries)
        _check_priority(priority)

        def decorate(func: Callable[..., Any]) -> Any:
            task_name = check_command_name(name if name is not None else command_name(func.__name__))
            limit = None
            if concurrency is not None or rate is not None:
                limit = make_limit(f"command:{task_name}", concurrency, rate, where=f"@command {task_name}")
            return self.app.task(
                func,
                base=OutboxTask,
                name=task_name,
                outbox_limit=limit,
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

    @functools.cached_property
    def connections(self) -> Connections:
        """What a push writes on besides SQLAlchemy's Session, Connection and Engine: connection adapters, and
        the current connection a push given none writes on (see ``connections.py``)."""
        return Connections()

    def push(self, conn: Any, call: Signature | None = None, *, tenant: str | None = None) -> uuid.UUID:
        """Insert a command, a Celery task signature or a canvas, in the caller's transaction.

        ``conn``: a SQLAlchemy Session, Connection or Engine, or what a connection adapter of
        this outbox recognises; ``push(call)`` pushes on the current connection (see
        :attr:`connections`). A signature (of an outbox command or of a plain Celery task) is one command;
        returns its id. A ``chain`` returns the id of its first command (the next ones
        are inserted as each completes: follow them with :meth:`children`); a ``group``
        or ``chord`` returns its batch's id (see :meth:`batch`). See ``canvas.py``.
        """
        if call is None:
            conn, call = None, conn
        if not isinstance(call, (_chain, _chord, group)):
            row = self.row_for(call)
            if tenant is not None:
                row["tenant"] = _tenant(tenant)
            return self._insert(conn, [row])[0]
        plan = canvas.next_in_chain(self.steps_for(call), NOTHING, None, _tenant(tenant))
        ids = self._insert(conn, plan)
        return plan.batches[0]["id"] if plan.batches else ids[0]

    def push_many(self, conn: Any, calls: Iterable[Signature] | None = None) -> list[uuid.UUID]:
        """Insert many commands at once in the caller's transaction (COPY on PostgreSQL from 50 rows).

        ``push_many(calls)``: on the current connection (see :meth:`push`).

        A call that cannot be pushed raises :class:`InvalidInput` (or the like) and
        nothing of the push stays written: the calls are checked before anything is
        written or, in a COPY large enough to be written while the calls are checked,
        what it wrote is undone (a savepoint). Either way the caller's transaction stays
        usable.
        """
        if calls is None:
            conn, calls = None, conn
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
        Under a router function in ``task_routes`` (it may route by the arguments) each
        call is validated and routed on its own, as :meth:`push` does it.
        """
        done: dict[Any, tuple[dict[str, Any], Any]] = {}
        templates: list[dict[str, Any]] = []
        plan: list[tuple[dict[str, Any], Any]] = []  # (template, its encoder; None: the row is the call's own)
        ids = uuid7_many(len(calls))  # ids in push order, drawn for the whole push at once
        shared = not celery_meaning.routes_by_arguments(self.app)
        for call, command_id in zip(calls, ids, strict=True):
            key = _template_key(call) if shared else None
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
        conn: Any,
        calls: Iterable[Signature] | None = None,
        *,
        tenant: str | None = None,
        then: Signature | None = None,
    ) -> BatchRef:
        """Insert commands as one batch, in the caller's transaction.

        ``then``: the continuation, a signature inserted exactly once when every member
        has reached a final state (unless the batch is canceled). Its first argument is
        the list of the members' outcomes, in push order: ``{"id", "name", "status",
        "output", "error"}`` each. Members can be added while the batch is open
        (:meth:`append_to_batch`). ``push_batch(calls)``: on the current connection (see :meth:`push`).
        """
        if calls is None:
            conn, calls = None, conn
        members = [self.row_for(call) for call in calls]
        continuation = self._call_step(then, pass_result=True) if then is not None else None
        plan = canvas.batch_plan(members, tenant=_tenant(tenant), continuation=continuation, chord=False)
        ids = self._insert(conn, plan)
        batch = plan.batches[0]
        return BatchRef(batch["id"], ids, batch["continuation_id"])

    def append_to_batch(self, conn: Any, batch_id: Any, calls: Iterable[Signature] | None = None) -> list[uuid.UUID]:
        """Add members to an open batch in the caller's transaction; :class:`BatchClosed` once it finished.

        ``append_to_batch(batch_id, calls)``: on the current connection (see :meth:`push`).
        """
        if calls is None:
            conn, batch_id, calls = None, conn, batch_id
        rows = [self.row_for(call) for call in calls]
        bid = _as_uuid(batch_id, BatchNotFound)
        return self._with_connection(conn, lambda c: self.store.append(c, bid, rows))

    async def push_async(self, conn: AsyncConnectable, call: Signature, *, tenant: str | None = None) -> uuid.UUID:
        """:meth:`push` on an ``AsyncSession``, ``AsyncConnection`` or ``AsyncEngine`` (psycopg async).

        Validation and errors are those of :meth:`push`; the rows are written at once, in the
        caller's transaction (a rollback drops them).
        """
        return await _on_async(conn, lambda sync: self.push(sync, call, tenant=tenant))

    async def push_many_async(self, conn: AsyncConnectable, calls: Iterable[Signature]) -> list[uuid.UUID]:
        """:meth:`push_many` under asyncio (see :meth:`push_async`)."""
        calls = list(calls)
        return await _on_async(conn, lambda sync: self.push_many(sync, calls))

    def _insert(self, conn: Any, rows: list[dict[str, Any]] | Plan) -> list[uuid.UUID]:
        return self._with_connection(conn, lambda c: self.store.insert(c, rows))

    def _with_connection(self, conn: Any, work: Callable[[sa.Connection], _T]) -> _T:
        return self.connections.run(conn, lambda c: self._checked(c, work))

    def _checked(self, conn: sa.Connection, work: Callable[[sa.Connection], _T]) -> _T:
        if not self.__dict__.get("_tables_seen"):
            self._check_tables(conn)
        return work(conn)

    def _check_tables(self, conn: sa.Connection | None = None) -> None:
        """Once per outbox, before its first push: a database without the tables gets one clear error.

        Read on the caller's connection, inside its transaction: on SQLite another connection
        would wait on the transaction's own write lock.
        """
        missing = self.store.missing_tables(conn)
        if missing:
            url = self.engine.url.render_as_string(hide_password=True)
            raise TablesMissing(
                f"the outbox tables are missing in {url} ({', '.join(missing)}): run `orch-outbox migrate` "
                "(`orch-outbox -A yourmodule:outbox migrate` for an outbox of your own)"
            )
        self.__dict__["_tables_seen"] = True

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
        if plain:  # Celery's transport options do not apply; what would run after it cannot be kept either
            lost = sorted(k for k in _AFTER_OPTIONS if options.get(k))
            if lost:
                raise InvalidOption(
                    f"{task.name}: a pushed signature cannot carry {lost} (callbacks, a chain or a chosen task_id); "
                    "push a canvas instead, outbox.push(session, chain(...)): the command id is the task id"
                )
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
            own_timeout = celery_meaning.plain_timeout(self.app, task, call.options)
            own_retries = celery_meaning.plain_retries(task)
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
