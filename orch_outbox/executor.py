"""The executor: runs one attempt of a command on a Celery worker and writes the outcome back.

1. Claim the attempt named by the message (dispatched → running, fenced by attempt and
   name, refused once the command expired). A duplicate, late or forged message finds
   nothing to claim and is dropped.
2. Rebuild the typed input from the row and run the handler under its timeout, its
   lease renewed by the process while it runs (``running.py``).
3. Write back in one fenced transaction: completed + output + on-success commands; or
   pending again (a retry, after a backoff); or failed + error + on-failure commands
   (``settle.py``, the one way an attempt ends).
4. Tell Celery how it ended, the way its tracer understands (see ``request.py``): the
   output is returned (``SUCCESS``); a recorded retry raises ``Retry`` (``RETRY``); a
   recorded failure raises the handler's exception (``FAILURE``); a cancellation
   ``REVOKED``; a message that ran nothing reports nothing.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any, NoReturn

from celery.exceptions import Retry, SoftTimeLimitExceeded, TimeLimitExceeded

from . import celery_meaning
from .canvas import Plan, next_in_chain
from .context import CommandContext, _set, context_of
from .errors import CommandCanceled, CommandTimeout, InvalidOption, LeaseLost, StoreUnavailable
from .jsoncodec import check_size, decode_arguments, encode
from .pid import current as current_pid
from .request import AttemptDropped, CommandRevoked
from .running import RUNNING, Entry, Guard
from .settings import Settings
from .settle import Attempt, Settler
from .store import ErrorInfo, Started, Store
from .task import Outcome, handler_of
from .telemetry import OFF, Telemetry
from .writeback import WriteBack

log = logging.getLogger("orch_outbox.executor")

#: Bounded retries of a write-back while the database is unreachable.
WRITE_BACK_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
#: Shortest delay of a retry the watchdog records: its pool process is ended right after.
WATCHDOG_MIN_DELAY = 1.0

ChainedRows = Callable[[str, str, Outcome], list[dict[str, Any]]]


def error_of(exc: BaseException) -> ErrorInfo:
    """The recorded form of an exception."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return ErrorInfo(name, str(exc), "".join(traceback.format_exception(exc)))


def attempt_of(started: Started) -> Attempt:
    """The attempt a start returned, as ``settle`` ends it."""
    return Attempt(started.id, started.name, started.attempt, started.input, started.retries, started.retries_left)


class Executor:
    """Runs commands for one outbox on a worker."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        settler: Settler,
        chained_rows: ChainedRows,
        worker_name: Callable[[], str | None] = lambda: None,
        telemetry: Telemetry = OFF,
    ) -> None:
        """``worker_name()``: this worker's registry name, the ``worker`` of the attempts it starts."""
        self.store = store
        self.telemetry = telemetry
        self.worker_name = worker_name
        self.settings = settings
        self.settler = settler
        self._chained_rows = chained_rows
        #: why messages were dropped without running (``stale``, ``malformed``, ``paused``, ``expired``, ``fenced``).
        self.dropped: Counter[str] = Counter()
        #: set in a worker: plain successes are written behind the handlers, in batches (see writeback.py).
        self.write_back_enabled = False
        self._write_back: WriteBack | None = None
        self._handlers_write = False
        self._write_back_lock = threading.Lock()

    def start_write_back(self, one_handler_thread: bool = False) -> None:
        """From now on, this process's plain successes go through its write-back (a worker calls this at start).

        ``one_handler_thread``: each process runs one handler at a time (prefork, solo), whose thread then writes
        the successes due before its next start (see :class:`WriteBack`).
        """
        self.write_back_enabled = True
        self._handlers_write = one_handler_thread

    @property
    def write_back(self) -> WriteBack | None:
        """This process's write-back (made on first use, once per process), or None outside a worker."""
        if not self.write_back_enabled:
            return None
        write_back = self._write_back
        if write_back is None or write_back.pid != current_pid():
            with self._write_back_lock:
                if self._write_back is None or self._write_back.pid != current_pid():
                    self._write_back = WriteBack(self.store, self._write, self._recorded, self._handlers_write)
                write_back = self._write_back
        return write_back

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every success this process handed to its write-back is written; False on timeout."""
        write_back = self._write_back
        return write_back.flush(timeout) if write_back is not None and write_back.pid == current_pid() else True

    # -- entry points -------------------------------------------------------------------

    def execute(self, task: Any, request: Any) -> Any:
        """Run the attempt a Celery message names; returns the encoded output or raises as Celery expects."""
        fence = parse_header(getattr(request, "outbox", None))
        if fence is None:
            self._drop("malformed")
            log.warning("dropped %s[%s]: the message carries no valid outbox header", task.name, request.id)
            raise AttemptDropped("malformed")
        command_id, attempt, timeout = fence
        lease = timeout + self.settings.lock_buffer
        worker = self.worker_name() or str(getattr(request, "hostname", None) or "unknown")
        write_back = self._write_back
        if write_back is not None and write_back.pid == current_pid():  # successes held long enough: written now
            write_back.write_due()
        started = self._write(lambda: self.store.start(command_id, attempt, task.name, worker, lease))
        if started is None:
            raise self._not_started(task.name, command_id, attempt)
        telemetry = self.telemetry
        if not telemetry.active:
            return self._run(task, started)
        due = started.scheduled_at
        telemetry.started(
            task.name, started.target, None if due is None else (dt.datetime.now(dt.UTC) - due).total_seconds()
        )
        with telemetry.process(task.name, started.target, started.id, started.attempt, request):
            return self._run(task, started)

    def _drop(self, reason: str) -> None:
        """Count a message dropped without running (``dropped``, and the ``dropped`` metric by reason)."""
        self.dropped[reason] += 1
        self.telemetry.count("dropped", reason=reason)

    def _not_started(self, name: str, command_id: uuid.UUID, attempt: int) -> Exception:
        """Why an attempt did not start: expired (reported revoked), paused or stale (nothing reported)."""
        if self._write(lambda: self.store.expire(command_id, attempt)):
            self._drop("expired")
            log.info("%s[%s] attempt %s: expired before it started; nothing runs", name, command_id, attempt)
            self.telemetry.count("expired", name=name)
            return CommandRevoked("expired", expired=True)
        if self._write(lambda: self.store.hold_back(command_id, attempt)):
            self._drop("paused")
            log.info("%s[%s] attempt %s: paused before it started; back to pending", name, command_id, attempt)
            return AttemptDropped("paused")
        self._drop("stale")
        log.info(
            "dropped %s %s attempt %s: not dispatched to this attempt (duplicate, late or canceled)",
            name,
            command_id,
            attempt,
        )
        return AttemptDropped("stale")

    def record_not_found(self, header: Any, name: str) -> None:
        """A worker received an attempt of a command it does not know: count it as a failed attempt."""
        fence = parse_header(header)
        if fence is None:
            return
        command_id, attempt, _ = fence
        error = ErrorInfo("NotRegistered", f"no command named {name!r} is registered on this worker")
        delay = self.settler.delay(Attempt(command_id, name, attempt, {}, 1, 1), error.type)
        status = self._write(lambda: self.store.not_found(command_id, attempt, error, delay))
        log.error("command %s[%s]: not registered on this worker; now %s", name, command_id, status)
        if status is not None:
            self.settler._report(
                Attempt(command_id, name, attempt, {}, 0, 0), "not_found", error, final=status == "failed"
            )
            if status == "failed":
                self.settler.results.failed(command_id, name, error)

    def retried_by_watchdog(self, header: Any) -> ErrorInfo | None:
        """The error of a retry the watchdog recorded for this attempt before ending its process, or None."""
        fence = parse_header(header)
        row = None if fence is None else self.store.get(fence[0])
        if fence is None or row is None:
            return None
        if row["status"] == "pending" and row["outcome"] == "timeout" and row["attempt"] == fence[1]:
            return ErrorInfo(row["error_type"] or "", row["error_message"] or "", row["error_traceback"])
        return None

    def renew(self, attempts: list[tuple[uuid.UUID, int]]) -> dict[tuple[uuid.UUID, int], bool]:
        """Keep the leases of this process's running attempts (see ``running.py``)."""
        return self.store.renew(attempts, self.settings.lock_buffer)

    # -- the attempt ----------------------------------------------------------------------

    def _run(self, task: Any, started: Started) -> Any:
        guard = Guard(started.timeout)
        _set(functools.partial(self._context, started, guard))  # made if the handler asks (most never do)
        handler = handler_of(task)
        try:
            args, kwargs = decode_arguments(handler.signature, handler.hints, started.input)
        except Exception as exc:  # the stored input cannot feed this handler: retrying will not help
            _set(None)
            self._end_failed(task, started, "failure", exc, error_of(exc), retry=False)
        interrupted: type[BaseException] | None = None
        result: Any = None
        error: Exception | None = None
        entry = Entry(
            started.id,
            started.attempt,
            guard,
            self.renew,
            lambda: self._stuck(task, started),
            self.settings.timeout_grace,
        )
        key = RUNNING.add(entry)
        try:
            try:
                with guard:
                    result = handler.run(*args, **kwargs)
            finally:
                _set(None)
                RUNNING.remove(key)
            interrupted = guard.fired
            if interrupted is LeaseLost:  # the handler swallowed the interrupt: the attempt still lost its hold
                interrupted, error = None, LeaseLost(f"attempt {started.attempt} of {started.id} lost its hold")
        except (CommandTimeout, SoftTimeLimitExceeded):
            interrupted = CommandTimeout
        except CommandCanceled:
            interrupted = CommandCanceled
        except Exception as exc:
            error = exc
        if interrupted is None and error is None:
            return self._succeeded(task, started, result)
        if interrupted is CommandCanceled or self._write(
            lambda: self.store.cancel_requested(started.id, started.attempt)
        ):
            self._canceled(started)
        if interrupted is CommandTimeout:
            message = f"the handler ran past its timeout of {started.timeout:g}s"
            timeout = TimeLimitExceeded(message)
            info = ErrorInfo("CommandTimeout", message)
            self._end_failed(task, started, "timeout", timeout, info, celery_meaning.retries_timeouts(task))
        assert error is not None
        if isinstance(error, Retry):  # self.retry() or autoretry_for: the outbox records the retry
            cause = error.exc if isinstance(error.exc, BaseException) else None
            info = error_of(cause) if cause is not None else ErrorInfo("Retry", str(error))
            final = cause or task.MaxRetriesExceededError(f"Can't retry {task.name}[{started.id}]: no retries left")
            self._end_failed(task, started, "failure", final, info, True, _seconds(error.when))
        self._end_failed(task, started, "failure", error, error_of(error), celery_meaning.retries_errors(task))

    def _context(self, started: Started, guard: Guard) -> CommandContext:
        """What ``orch_outbox.current()`` returns to the handler of ``started``."""
        return context_of(
            started,
            lambda seconds: self._heartbeat(started, guard, seconds),
            lambda: self.store.cancel_requested(started.id, started.attempt),
        )

    def _heartbeat(self, started: Started, guard: Guard, seconds: float | None) -> None:
        extend = started.timeout if seconds is None else seconds
        if isinstance(extend, bool) or not isinstance(extend, (int, float)) or not 0 < extend <= 7 * 24 * 3600:
            raise InvalidOption(f"heartbeat(seconds) must be > 0 and at most one week, got {seconds!r}")
        held, cancel = self._write(
            lambda: self.store.heartbeat(started.id, started.attempt, extend + self.settings.lock_buffer)
        )
        if not held:
            raise LeaseLost(f"attempt {started.attempt} of {started.id} no longer holds the command")
        if cancel:
            raise CommandCanceled(f"command {started.id} was canceled")
        guard.extend(extend)

    def _canceled(self, started: Started) -> NoReturn:
        ending = self.settler.canceled(attempt_of(started), write=self._write)
        self._log_fenced(ending.status is not None, started, "canceled")
        raise CommandRevoked("canceled") if ending.status else AttemptDropped("fenced")

    def _succeeded(self, task: Any, started: Started, result: Any) -> Any:
        try:
            where = f"output of {task.name}"
            output = encode(result, where)
            check_size(output, self.settings.max_input_bytes, where)
            hooks = getattr(task, "outbox_hooks", None)  # a plain task has none
            outcome = Outcome(started.id, task.name, started.input, result) if hooks and hooks.then else None
            children = Plan() if outcome is None else Plan.of(self._chained_rows(task.name, "then", outcome))
            if started.chain:  # the next step of a durable chain, with this output as its first argument
                children.extend(next_in_chain(started.chain, output, started.id, started.tenant))
        except Exception as exc:  # a bad output or a failing hook fails the attempt: no parent without children
            self._end_failed(task, started, "failure", exc, error_of(exc), celery_meaning.retries_errors(task))
        self.telemetry.count("completed", name=task.name, target=started.target)
        write_back = self.write_back
        if not children and started.batch_id is None and write_back is not None:
            write_back.submit(started, output)
            return output
        recorded = self._write(lambda: self.store.complete(started.id, started.attempt, output, children))
        self._log_fenced(recorded, started, "completed")
        if not recorded:
            raise AttemptDropped("fenced")
        return output

    def _end_failed(
        self,
        task: Any,
        started: Started,
        outcome: str,
        exc: BaseException,
        info: ErrorInfo,
        retry: bool,
        delay: float | None = None,
    ) -> NoReturn:
        """Record a retry or a failure (``settle``), then raise what tells Celery the same."""
        ending = self.settler.failed(attempt_of(started), outcome, info, retry=retry, delay=delay, write=self._write)
        if ending.status == "pending":
            done = started.retries - started.retries_left + 1
            log.warning(
                "%s[%s] attempt %s failed: %s: %s; retry %d of %d in %.2fs",
                started.name,
                started.id,
                started.attempt,
                info.type,
                info.message,
                done,
                started.retries,
                ending.delay,
            )
            raise Retry(message=f"{info.type}: {info.message}", exc=exc, when=ending.delay)
        if ending.status == "failed":
            raise exc
        self._log_fenced(False, started, outcome)
        raise AttemptDropped("fenced")

    def _stuck(self, task: Any, started: Started) -> None:
        """The watchdog's record of a handler that never returned past its timeout (its process ends next)."""
        message = (
            f"the handler was still running {self.settings.timeout_grace:g}s after its timeout of "
            f"{started.timeout:g}s; its pool process was ended"
        )
        self.settler.failed(
            attempt_of(started),
            "timeout",
            ErrorInfo("CommandTimeout", message),
            retry=celery_meaning.retries_timeouts(task),
            min_delay=WATCHDOG_MIN_DELAY,
            report_result=True,
        )

    def _recorded(self, recorded: bool, started: Started) -> None:
        self._log_fenced(recorded, started, "completed")

    def _log_fenced(self, recorded: bool, started: Started, what: str) -> None:
        if recorded:
            log.debug("%s %s attempt %s %s", started.name, started.id, started.attempt, what)
        else:
            self._drop("fenced")
            log.warning(
                "%s[%s] attempt %s: outcome not recorded, the attempt no longer holds the command "
                "(canceled, or its lease lapsed and it was rescued)",
                started.name,
                started.id,
                started.attempt,
            )

    def _write(self, write: Callable[[], Any]) -> Any:
        """Run a store write, retrying with backoff while the database is unreachable."""
        for delay in WRITE_BACK_DELAYS:
            try:
                return write()
            except StoreUnavailable as exc:
                log.warning("outbox database unavailable (%s); retrying in %.2fs", exc, delay)
                time.sleep(delay)
        return write()


def _seconds(when: Any) -> float | None:
    """Seconds from now of a Celery retry's ``when`` (seconds, or a datetime)."""
    if when is None:
        return None
    if isinstance(when, (int, float)):
        return float(when)
    if isinstance(when, dt.datetime):
        aware = when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
        return max((aware - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)
    return None


def parse_header(header: Any) -> tuple[uuid.UUID, int, float] | None:
    """(command id, attempt, timeout) of a message's ``outbox`` header, or None if it is not one."""
    try:
        raw_id, attempt, timeout = header[:3]
        fence = (uuid.UUID(raw_id if type(raw_id) is str else str(raw_id)), int(attempt), float(timeout))
    except (TypeError, ValueError):
        return None
    return fence if fence[1] >= 1 and fence[2] > 0 else None
