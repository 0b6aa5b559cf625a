"""What a task keeps of its Celery meaning when it runs through the outbox.

A plain ``@app.task`` pushed through the outbox behaves as Celery would run it:

- **queue**: the push's ``target`` / ``queue`` option, else the app's router
  (``task_routes``, the task's ``queue`` option, ``task_default_queue``);
- **retries**: ``max_retries`` bounds them (``None``, Celery's "for ever", is capped at
  :data:`MAX_RETRIES`); an exception retries only through ``autoretry_for`` (with
  ``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``, ``retry_kwargs``) or
  ``self.retry()`` (``countdown``, ``eta``, ``default_retry_delay``, ``max_retries``);
  any other exception fails the command at once, as in Celery;
- **time limits**: ``soft_time_limit`` (else ``time_limit``, else the app's
  ``task_soft_time_limit`` / ``task_time_limit``) is the run's timeout; Celery applies
  the task's own hard ``time_limit`` on prefork as usual; a timeout is retried only if
  ``SoftTimeLimitExceeded`` is in ``autoretry_for``;
- **results**: ``ignore_result`` as the task (or ``task_ignore_result``) says.

A command declared with ``@command`` keeps the outbox's options: ``target``, ``timeout``,
``retries`` (any failure or timeout is retried while retries are left) and ``backoff``.
A worker that dies mid-attempt consumes a retry of either kind (at least once).

``self.retry()`` inside an attempt run from the outbox never sends a message: it asks
the outbox to put the command back to pending, due after the countdown.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, NoReturn

from celery import Celery
from celery.app.routes import MapRoute
from celery.exceptions import Retry, SoftTimeLimitExceeded

from .errors import InvalidOption

#: Most retries a command may have (Celery's ``max_retries=None`` means this many).
MAX_RETRIES = 1000


def is_command(task: Any) -> bool:
    """True for a command declared with ``@command`` (not a plain Celery task)."""
    return getattr(task, "outbox_hooks", None) is not None


def routed_queue(app: Celery, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The queue Celery's router sends this task to, as ``apply_async`` would route it."""
    options = {"queue": task.queue} if getattr(task, "queue", None) else {}
    try:
        routed = app.amqp.router.route(options, task.name, args, kwargs, task_type=task)
    except Exception as exc:
        raise InvalidOption(f"the Celery router of {app.main!r} failed for {task.name}: {exc}") from exc
    queue = routed.get("queue")
    name = getattr(queue, "name", queue)
    return str(name) if name else None


def routes_by_arguments(app: Celery) -> bool:
    """Whether the app's ``task_routes`` hold a router function: it is given each call's arguments, and may route
    two calls of one task with the same options to different queues (a mapping routes by the name alone)."""
    return any(not isinstance(route, MapRoute) for route in app.amqp.routes)


def call_time_limit(options: Mapping[str, Any]) -> float | None:
    """The time limit Celery applies to one call (its options' ``soft_time_limit`` first, else ``time_limit``; 0:
    none), or None; a limit that is not a number of seconds raises :class:`InvalidOption` naming it."""
    for name in ("soft_time_limit", "time_limit"):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise InvalidOption(f"{name} must be a number of seconds (0: none), got {value!r}")
    limit = options.get("soft_time_limit") or options.get("time_limit")
    return float(limit) if limit else None


def plain_timeout(app: Celery, task: Any, options: Mapping[str, Any]) -> float | None:
    """A plain task's run timeout from its Celery time limits (the soft one first), or None: those of the call
    (``options``, a signature's), else the task's, else the app's."""
    conf = app.conf
    limits = (task.soft_time_limit, task.time_limit, conf.task_soft_time_limit, conf.task_time_limit)
    for value in (call_time_limit(options), *limits):
        if value:
            return float(value)
    return None


def plain_retries(task: Any) -> int:
    """A plain task's retry budget: its ``max_retries`` (``None``: :data:`MAX_RETRIES`)."""
    value = task.max_retries
    return MAX_RETRIES if value is None else min(int(value), MAX_RETRIES)


def retries_errors(task: Any) -> bool:
    """Whether an exception of the handler is retried by the outbox (commands) or fails at once (plain tasks)."""
    return is_command(task)


def retries_timeouts(task: Any) -> bool:
    """Whether a timeout is retried: always for commands; for plain tasks when ``autoretry_for`` covers it."""
    if is_command(task):
        return True
    autoretry = tuple(getattr(task, "autoretry_for", ()) or ())
    return any(isinstance(kind, type) and issubclass(SoftTimeLimitExceeded, kind) for kind in autoretry)


def from_outbox(task: Any) -> bool:
    """True while ``task`` runs an attempt the relay published (its message carries the outbox header)."""
    request = task.request
    return not request.called_directly and getattr(request, "outbox", None) is not None


def retry(
    task: Any,
    args: Any = None,
    kwargs: Any = None,
    exc: BaseException | None = None,
    throw: bool = True,
    eta: dt.datetime | None = None,
    countdown: float | None = None,
    max_retries: int | None = None,
    **options: Any,
) -> NoReturn:
    """``Task.retry`` for an attempt run from the outbox: raises :class:`Retry` and sends nothing.

    The executor records the retry (pending, due after the countdown) in the outbox.
    ``max_retries`` exceeded: the exception (or Celery's ``MaxRetriesExceededError``)
    is raised, as Celery does. New ``args``/``kwargs`` are refused: the input lives in the
    row and a retry runs the same command.
    """
    if args is not None or kwargs is not None:
        raise InvalidOption("self.retry() of a command run from the outbox cannot change its arguments")
    request = task.request
    limit = max_retries if max_retries is not None else (None if is_command(task) else task.max_retries)
    if limit is not None and request.retries >= limit:
        if exc is not None:
            raise exc
        raise task.MaxRetriesExceededError(
            f"Can't retry {task.name}[{request.id}] args:{request.args} kwargs:{request.kwargs}"
        )
    if countdown is None and eta is not None:
        eta = eta if eta.tzinfo is not None else eta.replace(tzinfo=dt.UTC)
        countdown = max((eta - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)
    if countdown is None:
        countdown = task.default_retry_delay
    raise Retry(exc=exc, when=float(countdown or 0.0))
