"""The Outbox: one outbox table attached to one Celery app.

``Outbox(app, engine)`` registers the relay and the lease rescuer as tasks, adds them to
the beat schedule, and offers the ``@outbox.command`` decorator, ``push`` and the
calls that read and cancel commands. ``orch_outbox.app`` is a ready-made Celery app
with an Outbox attached; library mode attaches one to an application's own app.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from celery import Celery, signals
from celery.canvas import Signature
from sqlalchemy.orm import Session

from . import backoff as backoff_mod
from .clock import Clock
from .errors import CommandNotFound, ConfigurationError, InvalidInput, InvalidOption, UnknownCommand
from .jsoncodec import check_size, encode, encode_arguments
from .settings import Settings, validate_target
from .store import ErrorInfo, Store, make_engine
from .task import Hooks, OutboxTask, Outcome
from .uuid7 import uuid7

log = logging.getLogger("orch_outbox")

RELAY_TASK = "orch_outbox.relay"
RESCUE_TASK = "orch_outbox.rescue"
LOCAL_TASKS = frozenset({RELAY_TASK, RESCUE_TASK})

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
    }
)
#: The worker remote-control command that interrupts a running attempt (see executor.py).
CANCEL_CONTROL = "orch_outbox_cancel"
MAX_UNIQUE_KEY = 200
MAX_NAME = 200
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_RETRIES = 1000

_BY_APP: weakref.WeakKeyDictionary[Celery, Outbox] = weakref.WeakKeyDictionary()


def outbox_of(app: Celery) -> Outbox:
    """The Outbox attached to a Celery app."""
    try:
        return _BY_APP[app]
    except KeyError:
        raise ConfigurationError(f"no Outbox is attached to the Celery app {app.main!r}") from None


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

    @property
    def is_final(self) -> bool:
        """True once the command can change no more (completed, failed, canceled or expired)."""
        return self.status in ("completed", "failed", "canceled", "expired")

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

    :param app: the Celery app whose workers run the commands.
    :param engine: a SQLAlchemy engine or URL; by default ``outbox_database_url``.
    :param clock: replaces the clock (tests); then the database clock is not used.
    :param settings: overrides of ``outbox_*`` settings, by name without the prefix.
    """

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
        signals.beat_init.connect(self._check_at_start, weak=False)

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
    def executor(self) -> Any:
        """Runs commands on the worker."""
        from .executor import Executor

        return Executor(self)

    @functools.cached_property
    def relay(self) -> Any:
        """Publishes due commands."""
        from .relay import Relay

        return Relay(self)

    @functools.cached_property
    def rescuer(self) -> Any:
        """Returns commands whose lease lapsed."""
        from .relay import Rescuer

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

    def push(self, conn: Session | sa.Connection | sa.Engine, call: Signature) -> uuid.UUID:
        """Insert one command (a signature of an outbox command) in the caller's transaction."""
        return self._insert(conn, [self.row_for(call)])[0]

    def push_many(self, conn: Session | sa.Connection | sa.Engine, calls: Iterable[Signature]) -> list[uuid.UUID]:
        """Insert many commands with one statement (executemany) in the caller's transaction."""
        return self._insert(conn, [self.row_for(call) for call in calls])

    def _insert(self, conn: Session | sa.Connection | sa.Engine, rows: list[dict[str, Any]]) -> list[uuid.UUID]:
        if isinstance(conn, Session):
            return self.store.insert(conn.connection(), rows)
        if isinstance(conn, sa.Connection):
            return self.store.insert(conn, rows)
        if isinstance(conn, sa.Engine):
            with conn.begin() as own:
                return self.store.insert(own, rows)
        raise TypeError(f"push needs a SQLAlchemy Session, Connection or Engine, not {type(conn).__name__}")

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse unknown push options early, with the list of known ones."""
        unknown = sorted(set(options) - PUSH_OPTIONS)
        if unknown:
            raise InvalidOption(f"unknown push option(s) {unknown}; known: {sorted(PUSH_OPTIONS)}")

    def row_for(self, call: Signature, parent_id: uuid.UUID | None = None) -> dict[str, Any]:
        """The row a signature becomes, validated; raises before anything is written."""
        if not isinstance(call, Signature):
            raise TypeError(f"expected a command signature such as send_email.s(...), got {type(call).__name__}")
        task = self.task(call.task)
        options = dict(call.options)
        self.check_options(options)
        settings = self.settings
        data = encode_arguments(task.handler_signature, tuple(call.args), dict(call.kwargs))
        check_size(data, settings.max_input_bytes, f"input of {task.name}")
        target = options.get("target", options.get("queue"))
        if target is None:
            target = task.outbox_target or settings.default_target or self.app.conf.task_default_queue
        try:
            target = validate_target(target)
        except ConfigurationError as exc:
            raise InvalidOption(str(exc)) from None
        timeout = _pick(options.get("timeout"), task.outbox_timeout, settings.default_timeout)
        retries = _pick(options.get("retries"), task.outbox_retries, settings.default_retries)
        priority = _pick(options.get("priority"), task.outbox_priority, 0)
        _check_timeout(timeout)
        _check_retries(retries)
        _check_priority(priority)
        return {
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
            "expires_at": _expiry(options),
            "unique_key": _unique_key(options.get("unique_key")),
        }

    def chained_rows(self, name: str, kind: str, outcome: Outcome) -> list[dict[str, Any]]:
        """Rows for the commands a finished command's hooks of ``kind`` return."""
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
        cid = _as_uuid(command_id)

        def children_for(name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
            return self.chained_rows(name, "if_canceled", Outcome(cid, name, data))

        was = self.store.cancel(cid, children_for)
        if was is None:
            return False
        status, attempt = was
        if status == "running":
            self.tell_workers_to_cancel(f"{cid}:{attempt}")
        return True

    def tell_workers_to_cancel(self, task_id: str) -> None:
        """Broadcast a cancel of one running attempt; a failure is logged (heartbeats still tell the handler)."""
        try:
            self.app.control.broadcast(CANCEL_CONTROL, arguments={"task_id": task_id})
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

    def _add_beat_entries(self, sender: Celery | None = None, **_: Any) -> None:
        settings = self.settings
        schedule = self.app.conf.beat_schedule
        schedule.setdefault("orch-outbox-relay", {"task": RELAY_TASK, "schedule": settings.poll_interval})
        schedule.setdefault("orch-outbox-rescue", {"task": RESCUE_TASK, "schedule": settings.rescue_interval})
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

    def _after_fork(self, **_: Any) -> None:
        """In a prefork child: never reuse database connections opened by the parent."""
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


def command_name(func_name: str) -> str:
    """``SendEmailCommand`` / ``send_email`` → ``send_email``."""
    base = func_name[: -len("Command")] if func_name.endswith("Command") and func_name != "Command" else func_name
    out = []
    for i, ch in enumerate(base):
        if ch.isupper() and i and (base[i - 1].islower() or (i + 1 < len(base) and base[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out).replace("__", "_")


def _pick(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise CommandNotFound(f"{value!r} is not a command id") from None


def _unique_key(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_UNIQUE_KEY or not _storable_text(value):
        raise InvalidOption(
            f"unique_key must be valid text of 1..{MAX_UNIQUE_KEY} characters without NUL, got {value!r}"
        )
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
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not _storable_text(name):
        raise ConfigurationError(f"a command name must be valid text of 1..{MAX_NAME} characters, got {name!r}")
    return name


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


def _expiry(options: dict[str, Any]) -> dt.datetime | None:
    value = options.get("expires_at", options.get("expires"))
    if value is None or isinstance(value, dt.datetime):
        return _aware(value, "expires_at")
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=_seconds(value, "expires"))


__all__: Sequence[str] = ("CommandInfo", "Outbox", "command_name", "outbox_of")
