"""The executor: runs one attempt of a command on a Celery worker and writes the outcome back.

1. Claim the attempt named by the message (dispatched → running, fenced by attempt and
   name). A duplicate, late or forged message finds nothing to claim and is dropped.
2. Rebuild the typed input from the row and run the handler under its timeout.
3. Write back in one fenced transaction: completed + output + on-success commands; or
   pending again (a retry, after a backoff); or failed + error + on-failure commands.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded

from . import backoff as backoff_mod
from .context import CommandContext, _set
from .errors import CommandTimeout, StoreUnavailable
from .jsoncodec import check_size, decode_arguments, encode
from .store import ErrorInfo, Started
from .task import OutboxTask, Outcome

if TYPE_CHECKING:
    from .outbox import Outbox

log = logging.getLogger("orch_outbox.executor")

#: Bounded retries of a write-back while the database is unreachable.
WRITE_BACK_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


class _Watchdog:
    """Raises CommandTimeout in the handler's thread when its timeout passes.

    The exception is delivered at the handler's next Python bytecode; a handler blocked
    inside C code sees it when the call returns. Under the prefork pool, Celery's hard
    time limit (timeout + lock buffer) ends a handler that never returns.
    """

    def __init__(self, seconds: float) -> None:
        self.thread_id = threading.get_ident()
        self.fired = False
        self._lock = threading.Lock()
        self._active = True
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active = False
            self._timer.cancel()
            if self.fired:  # clear a timeout not yet delivered: the handler already returned
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), None)

    def _fire(self) -> None:
        with self._lock:
            if not self._active:
                return
            self.fired = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), ctypes.py_object(CommandTimeout))


def error_of(exc: BaseException) -> ErrorInfo:
    """The recorded form of an exception."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return ErrorInfo(name, str(exc), "".join(traceback.format_exception(exc)))


class Executor:
    """Runs commands for one outbox on a worker."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.store = outbox.store
        self.settings = outbox.settings
        #: why messages were dropped without running (``duplicate``, ``malformed``...).
        self.dropped: Counter[str] = Counter()

    # -- entry points -------------------------------------------------------------------

    def execute(self, task: OutboxTask, request: Any) -> Any:
        """Run the attempt a Celery message names; returns the encoded output, or None."""
        fence = _parse_header(getattr(request, "outbox", None))
        if fence is None:
            self.dropped["malformed"] += 1
            log.warning("dropped %s[%s]: the message carries no valid outbox header", task.name, request.id)
            return None
        command_id, attempt, timeout = fence
        lease = timeout + self.settings.lock_buffer
        worker = str(getattr(request, "hostname", None) or "unknown")
        started = self._write(lambda: self.store.start(command_id, attempt, task.name, worker, lease))
        if started is None:
            self.dropped["stale"] += 1
            log.info(
                "dropped %s %s attempt %s: not dispatched to this attempt (duplicate, late or canceled)",
                task.name,
                command_id,
                attempt,
            )
            return None
        return self._run(task, started)

    def record_not_found(self, header: Any, name: str) -> None:
        """A worker received an attempt of a command it does not know: count it as a failed attempt."""
        fence = _parse_header(header)
        if fence is None:
            return
        command_id, attempt, _ = fence
        error = ErrorInfo("NotRegistered", f"no command named {name!r} is registered on this worker")
        delay = self._delay(None, 1, error.type)
        status = self._write(lambda: self.store.not_found(command_id, attempt, error, delay))
        log.error("command %s %s: not registered on this worker; now %s", name, command_id, status)

    # -- the attempt ----------------------------------------------------------------------

    def _run(self, task: OutboxTask, started: Started) -> Any:
        ctx = CommandContext(
            started.id, started.name, started.target, started.attempt, started.retries, started.retries_left
        )
        _set(ctx)
        try:
            args, kwargs = decode_arguments(task.handler_signature, task.handler_hints, started.input)
        except Exception as exc:  # the stored input cannot feed this handler: retrying will not help
            self._fail(task, started, "failure", error_of(exc))
            _set(None)
            return None
        timed_out = False
        result: Any = None
        error: BaseException | None = None
        try:
            try:
                with _Watchdog(started.timeout) as watchdog:
                    result = task.run(*args, **kwargs)
            finally:
                _set(None)
            timed_out = watchdog.fired
        except (CommandTimeout, SoftTimeLimitExceeded):
            timed_out = True
        except Exception as exc:
            error = exc
        if timed_out:
            message = f"the handler ran past its timeout of {started.timeout:g}s"
            return self._failed(task, started, "timeout", ErrorInfo("CommandTimeout", message))
        if error is not None:
            return self._failed(task, started, "failure", error_of(error))
        return self._succeeded(task, started, result)

    def _succeeded(self, task: OutboxTask, started: Started, result: Any) -> Any:
        try:
            output = encode(result, f"output of {task.name}")
            check_size(output, self.settings.max_input_bytes, f"output of {task.name}")
            decoded_output = result
            children = self.outbox.chained_rows(
                task.name, "then", Outcome(started.id, task.name, started.input, decoded_output)
            )
        except Exception as exc:  # a bad output or a failing hook fails the attempt: no parent without children
            return self._failed(task, started, "failure", error_of(exc))
        recorded = self._write(lambda: self.store.complete(started.id, started.attempt, output, children))
        self._log_fenced(recorded, started, "completed")
        return output

    def _failed(self, task: OutboxTask, started: Started, outcome: str, error: ErrorInfo) -> None:
        if started.retries_left > 0:
            retry_number = started.retries - started.retries_left + 1
            delay = self._delay(task, retry_number, error.type)
            recorded = self._write(lambda: self.store.retry(started.id, started.attempt, outcome, error, delay))
            self._log_fenced(recorded, started, f"retried in {delay:.2f}s")
            return
        self._fail(task, started, outcome, error)

    def _fail(self, task: OutboxTask, started: Started, outcome: str, error: ErrorInfo) -> None:
        try:
            children = self.outbox.chained_rows(
                task.name, "if_failed", Outcome(started.id, task.name, started.input, None, error)
            )
        except Exception as exc:
            log.exception("if_failed hook of %s raised; recording the failure without its chained commands", task.name)
            error = ErrorInfo(error.type, f"{error.message} (and the if_failed hook raised {exc!r})", error.traceback)
            children = []
        recorded = self._write(lambda: self.store.fail(started.id, started.attempt, outcome, error, children))
        self._log_fenced(recorded, started, "failed")

    def _delay(self, task: OutboxTask | None, retry_number: int, error_type: str) -> float:
        policy = (task.outbox_backoff if task is not None else None) or self.outbox.backoff
        return backoff_mod.delay_for(policy, retry_number, error_type, self.settings.retry_backoff_max)

    def _log_fenced(self, recorded: bool, started: Started, what: str) -> None:
        if recorded:
            log.debug("%s %s attempt %s %s", started.name, started.id, started.attempt, what)
        else:
            self.dropped["fenced"] += 1
            log.warning(
                "%s %s attempt %s: outcome not recorded, the attempt no longer holds the command "
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


def _parse_header(header: Any) -> tuple[uuid.UUID, int, float] | None:
    try:
        raw_id, attempt, timeout = header
        fence = (uuid.UUID(str(raw_id)), int(attempt), float(timeout))
    except (TypeError, ValueError):
        return None
    return fence if fence[1] >= 1 and fence[2] > 0 else None
