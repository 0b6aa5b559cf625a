"""The Celery task class behind every outbox command.

A command is a real Celery task (so Flower, ``celery inspect registered``, routing,
rate limits and pools apply) whose execution goes through the outbox's executor: the
message only says *which attempt* to run; the input comes from the database row.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Task

from . import celery_meaning
from .errors import ChainedPush
from .flow import Limit
from .registry import outbox_of
from .store import ErrorInfo

if TYPE_CHECKING:
    from .outbox import Outbox

HOOK_KINDS = ("then", "if_failed", "if_canceled")


@dataclass(frozen=True)
class Outcome:
    """What a chaining hook receives: the finished command, its input, and its output or error."""

    id: uuid.UUID
    name: str
    input: dict[str, Any]
    output: Any = None
    error: ErrorInfo | None = None


Hook = Callable[[Outcome], Iterable[Any] | None]


@dataclass
class Hooks:
    """The chaining hooks of one command, by kind."""

    then: list[Hook] = field(default_factory=list)
    if_failed: list[Hook] = field(default_factory=list)
    if_canceled: list[Hook] = field(default_factory=list)


#: Celery builds each message's request from this class (see ``request.py``).
REQUEST_CLASS = "orch_outbox.request:OutboxRequest"


class OutboxTask(Task):  # type: ignore[misc]
    """Base class of outbox commands. Create them with ``@outbox.command`` or ``@orch_outbox.command``.

    ``delay()`` / ``apply_async()`` push the command through the outbox in a transaction
    of their own on the outbox's engine (durable, routed to its target) and return an
    ``AsyncResult`` of the command id; to push inside your own transaction use
    ``cmd.push(session, ...)``.
    """

    Request = REQUEST_CLASS
    typing = False
    outbox_target: str | None = None
    outbox_timeout: float | None = None
    outbox_retries: int | None = None
    outbox_priority: int = 0
    outbox_backoff: Callable[[int, str], float] | None = None
    outbox_hooks: Hooks
    outbox_hide_input: bool = False
    #: this command's own cluster-wide limit (``@command(concurrency=, rate=)``), if any
    outbox_limit: Limit | None = None

    # -- pushing ------------------------------------------------------------------------

    def push(self, *args: Any, **kwargs: Any) -> uuid.UUID:
        """Insert this command into the outbox in the caller's transaction; returns its id.

        ``cmd.push(session, *args, **kwargs)``: the first argument is what the push writes on (a
        SQLAlchemy Session, Connection or Engine, or what a connection adapter of the outbox
        recognises); on an outbox with a current connection (``outbox.connections.current``,
        e.g. ``DjangoOutbox``) it may be left out: ``cmd.push(*args, **kwargs)``.
        """
        conn, args = self.outbox.connections.split(args)
        return self.outbox.push(conn, self.s(*args, **kwargs))

    async def push_async(self, conn: Any, /, *args: Any, **kwargs: Any) -> uuid.UUID:
        """:meth:`push` under asyncio: ``await cmd.push_async(async_session, ...)``."""
        return await self.outbox.push_async(conn, self.s(*args, **kwargs))

    def options(self, **options: Any) -> PushWith:
        """Per-push options: ``send_email.options(delay=30, priority=5).push(session, ...)``.

        Options: ``target``, ``delay`` (seconds), ``scheduled_at`` (aware datetime),
        ``expires_at`` (aware datetime), ``expires`` (seconds), ``retries``,
        ``timeout``, ``priority``, ``unique_key`` (while a command with that key is not
        final, pushing it again returns that command's id; a different name or input
        raises :class:`~orch_outbox.errors.UniqueConflict`).
        """
        self.outbox.check_options(options)
        return PushWith(self, options)

    # -- chaining -----------------------------------------------------------------------

    def then(self, hook: Hook) -> Hook:
        """Register a hook run on success; it returns the commands to enqueue (``cmd.s(...)``)."""
        self.outbox_hooks.then.append(hook)
        return hook

    def if_failed(self, hook: Hook) -> Hook:
        """Register a hook run when the command has failed for good (after its last retry)."""
        self.outbox_hooks.if_failed.append(hook)
        return hook

    def if_canceled(self, hook: Hook) -> Hook:
        """Register a hook run when the command is canceled."""
        self.outbox_hooks.if_canceled.append(hook)
        return hook

    # -- execution ----------------------------------------------------------------------

    @property
    def outbox(self) -> Outbox:
        """The outbox this command belongs to."""
        return outbox_of(self.app)

    @functools.cached_property
    def handler_signature(self) -> inspect.Signature:
        """The handler's signature, used to bind pushed arguments."""
        return inspect.signature(self.run)

    @functools.cached_property
    def handler_hints(self) -> dict[str, Any]:
        """The handler's resolved type hints, used to rebuild typed input and output."""
        try:
            return typing.get_type_hints(self.run)
        except Exception:  # unresolvable forward references: fall back to plain JSON
            return {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:
            return self.run(*args, **kwargs)
        return self.outbox.executor.execute(self, self.request)

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Push through the outbox in a transaction of its own; returns the ``AsyncResult`` of the command id.

        Celery's ``queue``, ``countdown``, ``eta``, ``expires`` and ``priority`` map to the
        push's options, its ``soft_time_limit`` (else ``time_limit``) to ``timeout``; transport
        options (``serializer``, ``retry``, ...) do not apply.
        Callbacks, chains and a chosen ``task_id`` are refused: use ``outbox.push`` with a
        canvas, or ``@cmd.then`` hooks.
        """
        if link or link_error or options.get("chain") or options.get("chord") or task_id is not None:
            raise ChainedPush(
                f"{self.name}.apply_async() cannot carry callbacks, a chain or a task_id: push the canvas with "
                "outbox.push(session, ...) inside your transaction, or chain with @cmd.then"
            )
        known = self.outbox.push_options
        given = {k: v for k, v in options.items() if k in known}
        limit = celery_meaning.call_time_limit(options)
        if limit is not None and "timeout" not in given:  # Celery's time limit of this call: its run's timeout
            given["timeout"] = limit
        call = self.signature(args, kwargs, **given)
        command_id = self.outbox.push(self.outbox.engine, call)
        return self.AsyncResult(str(command_id))

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``self.retry()``; inside an attempt run from the outbox it asks the outbox to retry (no message)."""
        if celery_meaning.from_outbox(self):
            celery_meaning.retry(self, *args, **kwargs)
        return super().retry(*args, **kwargs)


@dataclass(frozen=True)
class Handler:
    """What the executor calls for a task: the function, its signature and its type hints."""

    run: Callable[..., Any]
    signature: inspect.Signature
    hints: dict[str, Any]


#: Attribute holding a plain Celery task's own ``run`` once the outbox adopted the task.
ORIGINAL_RUN = "_orch_outbox_run"
#: Attribute holding a task's :class:`Handler` (working a signature out per push or per command costs).
_HANDLER = "_orch_outbox_handler"


def handler_of(task: Any) -> Handler:
    """The handler of an outbox command, or of a plain Celery task pushed through the outbox (worked out once per
    task, and again when its ``run`` is replaced)."""
    command = isinstance(task, OutboxTask)
    run = task.run if command else getattr(task, ORIGINAL_RUN, None) or task.run
    known = getattr(task, _HANDLER, None)
    if known is not None and known.run == run:
        return known  # type: ignore[no-any-return]
    if command:
        handler = Handler(run, task.handler_signature, task.handler_hints)
    else:
        try:
            hints = typing.get_type_hints(run)
        except Exception:
            hints = {}
        handler = Handler(run, inspect.signature(run), hints)
    with contextlib.suppress(AttributeError, TypeError):  # a task object that takes no attributes: worked out each time
        setattr(task, _HANDLER, handler)
    return handler


def adopt(task: Any, execute: Callable[[Any, Any], Any]) -> bool:
    """Let a plain Celery task run attempts of outbox rows; False if it already could.

    The task's ``run`` is wrapped (on this task object only): a message the relay
    published carries the ``outbox`` header and goes through ``execute`` (fenced start,
    input read from the row, outcome written back); any other message, and direct
    calls, run the task exactly as before.
    """
    if isinstance(task, OutboxTask) or getattr(task, ORIGINAL_RUN, None) is not None:
        return False
    original = task.run

    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        request = task.request
        if request.called_directly or getattr(request, "outbox", None) is None:
            return original(*args, **kwargs)
        return execute(task, request)

    celery_retry = task.retry

    @functools.wraps(celery_retry)
    def retry(*args: Any, **kwargs: Any) -> Any:
        if celery_meaning.from_outbox(task):
            celery_meaning.retry(task, *args, **kwargs)
        return celery_retry(*args, **kwargs)

    setattr(task, ORIGINAL_RUN, original)
    task.run = run
    task.retry = retry
    task.Request = REQUEST_CLASS  # only changes how outbox messages report; others as before (see request.py)
    return True


class PushWith:
    """A command with per-push options, from :meth:`OutboxTask.options`."""

    def __init__(self, task: OutboxTask, options: dict[str, Any]) -> None:
        self.task = task
        self._options = options

    def s(self, *args: Any, **kwargs: Any) -> Any:
        """A Celery signature carrying these options."""
        return self.task.s(*args, **kwargs).set(**self._options)

    def push(self, *args: Any, **kwargs: Any) -> uuid.UUID:
        """Insert the command with these options; returns its id (the connection as in :meth:`OutboxTask.push`)."""
        conn, args = self.task.outbox.connections.split(args)
        return self.task.outbox.push(conn, self.s(*args, **kwargs))

    async def push_async(self, conn: Any, /, *args: Any, **kwargs: Any) -> uuid.UUID:
        """:meth:`push` under asyncio."""
        return await self.task.outbox.push_async(conn, self.s(*args, **kwargs))
