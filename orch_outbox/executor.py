"""The executor: runs one attempt of a command on a Celery worker and writes the outcome back.

1. Claim the attempt named by the message (dispatched → running, fenced by attempt and
   name). A duplicate, late or forged message finds nothing to claim and is dropped.
2. Rebuild the typed input from the row and run the handler under its timeout.
3. Write back in one fenced transaction: completed + output + on-success commands; or
   pending again (a retry, after a backoff); or failed + error + on-failure commands.
"""

from __future__ import annotations

import atexit
import ctypes
import heapq
import logging
import os
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.control import control_command

from . import backoff as backoff_mod
from .canvas import Plan, next_in_chain
from .context import CommandContext, _set
from .errors import CommandCanceled, CommandTimeout, InvalidOption, LeaseLost, StoreUnavailable
from .jsoncodec import check_size, decode_arguments, encode
from .store import ErrorInfo, Started
from .task import Outcome, handler_of

if TYPE_CHECKING:
    from .outbox import Outbox

log = logging.getLogger("orch_outbox.executor")

#: Bounded retries of a write-back while the database is unreachable.
WRITE_BACK_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


class _Deadlines:
    """One thread per process fires every handler timeout (a Timer thread per attempt costs too much)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Guard]] = []
        self._seq = 0
        self._finished = 0
        self._thread: threading.Thread | None = None

    def finished(self) -> None:
        """A guard ended before its deadline; compact the heap when such entries dominate it."""
        with self._cond:
            self._finished += 1
            if self._finished > 1000 and self._finished * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if entry[2].pending(entry[1])]
                heapq.heapify(self._heap)
                self._finished = 0

    def schedule(self, guard: _Guard, at: float) -> int:
        """Fire ``guard`` at monotonic time ``at``; returns a token (a later schedule supersedes it)."""
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (at, self._seq, guard))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="orch-outbox-timeouts", daemon=True)
                self._thread.start()
            if self._heap[0][1] == self._seq:  # the new deadline comes first: the thread must wake earlier
                self._cond.notify()
            return self._seq

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, token, guard = heapq.heappop(self._heap)
            guard.expire(token)


DEADLINES = _Deadlines()


class _Guard:
    """Delivers an exception into the handler's thread: its timeout, or a cancellation.

    The exception is delivered at the handler's next Python bytecode; a handler blocked
    inside C code sees it when the call returns. Under the prefork pool, Celery's hard
    time limit (if set) ends a handler that never returns.
    """

    def __init__(self, seconds: float) -> None:
        self.thread_id = threading.get_ident()
        self.started = time.monotonic()
        self.fired: type[BaseException] | None = None
        self._lock = threading.Lock()
        self._active = False
        self._seconds = seconds
        self._token = 0

    def __enter__(self) -> _Guard:
        with self._lock:
            self._active = True
            self._token = DEADLINES.schedule(self, time.monotonic() + self._seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active = False
            if self.fired:  # clear an exception not yet delivered: the handler already returned
                _async_raise(self.thread_id, None)
        DEADLINES.finished()

    def pending(self, token: int) -> bool:
        """Whether the deadline scheduled as ``token`` still matters."""
        return self._active and token == self._token

    def extend(self, seconds: float) -> None:
        """Move the timeout to ``seconds`` from now."""
        with self._lock:
            if self._active and not self.fired:
                self._token = DEADLINES.schedule(self, time.monotonic() + seconds)

    def expire(self, token: int) -> None:
        """The deadline scheduled as ``token`` passed (ignored if superseded or finished)."""
        if token == self._token:
            self.interrupt(CommandTimeout)

    def interrupt(self, kind: type[BaseException]) -> bool:
        """Raise ``kind`` in the handler's thread, once; False if it returned or was interrupted already."""
        with self._lock:
            if not self._active or self.fired:
                return False
            self.fired = kind
            _async_raise(self.thread_id, kind)
            return True


def _async_raise(thread_id: int, kind: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), None if kind is None else ctypes.py_object(kind)
    )


class _Running:
    """The attempts running in this process, by Celery task id ("<command id>:<attempt>")."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._guards: dict[str, tuple[Executor, uuid.UUID, int, _Guard]] = {}
        self._watcher: threading.Thread | None = None

    def add(self, executor: Executor, started: Started, guard: _Guard) -> str:
        key = f"{started.id}:{started.attempt}"
        with self._lock:
            self._guards[key] = (executor, started.id, started.attempt, guard)
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._watch, name="orch-outbox-cancel-watch", daemon=True)
                self._watcher.start()
        return key

    def remove(self, key: str) -> None:
        with self._lock:
            self._guards.pop(key, None)

    def interrupt(self, key: str) -> bool:
        with self._lock:
            entry = self._guards.get(key)
        return entry is not None and entry[3].interrupt(CommandCanceled)

    def _watch(self) -> None:
        """Poll for cancellations of attempts running longer than a poll interval.

        The broadcast (``orch_outbox_cancel``) reaches a threads or solo pool at once;
        this loop is what tells a prefork child, or a worker that missed the broadcast.
        Short attempts cost nothing: only those older than the interval are checked.
        """
        while True:
            time.sleep(CANCEL_POLL_SECONDS)
            now = time.monotonic()
            with self._lock:
                old = [e for e in self._guards.values() if now - e[3].started >= CANCEL_POLL_SECONDS]
            by_executor: dict[int, list[tuple[Executor, uuid.UUID, int, _Guard]]] = {}
            for entry in old:
                by_executor.setdefault(id(entry[0]), []).append(entry)
            for entries in by_executor.values():
                executor = entries[0][0]
                try:
                    wanted = executor.store.cancel_requests([(e[1], e[2]) for e in entries])
                except Exception as exc:  # the database is down: the write-back path retries; look again later
                    log.debug("cancel watch: %s", exc)
                    continue
                for _, command_id, attempt, guard in entries:
                    if (command_id, attempt) in wanted and guard.interrupt(CommandCanceled):
                        log.info("command %s attempt %s: canceled while running; interrupting", command_id, attempt)


#: Seconds between the checks for cancellations of long-running attempts in one worker process.
CANCEL_POLL_SECONDS = 1.0
RUNNING = _Running()


@control_command(args=[("task_id", str)], signature="<task_id>")  # type: ignore[untyped-decorator]
def orch_outbox_cancel(state: Any, task_id: str) -> dict[str, str]:
    """Worker remote control: interrupt a running attempt (``Outbox.cancel`` broadcasts it)."""
    if RUNNING.interrupt(task_id):
        return {"ok": f"interrupted {task_id}"}
    return {"ok": f"{task_id} is not running in this process"}


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
        #: set in a worker: plain successes are written behind the handlers, in batches (see _WriteBack).
        self.write_back_enabled = False
        self._write_back: _WriteBack | None = None
        self._write_back_lock = threading.Lock()

    def start_write_back(self) -> None:
        """From now on, this process's plain successes go through its write-back (a worker calls this at start)."""
        self.write_back_enabled = True

    @property
    def write_back(self) -> _WriteBack | None:
        """This process's write-back (made on first use, once per process), or None outside a worker."""
        if not self.write_back_enabled:
            return None
        write_back = self._write_back
        if write_back is None or write_back.pid != os.getpid():
            with self._write_back_lock:
                if self._write_back is None or self._write_back.pid != os.getpid():
                    self._write_back = _WriteBack(self)
                write_back = self._write_back
        return write_back

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every success this process handed to its write-back is written; False on timeout."""
        write_back = self._write_back
        return write_back.flush(timeout) if write_back is not None and write_back.pid == os.getpid() else True

    # -- entry points -------------------------------------------------------------------

    def execute(self, task: Any, request: Any) -> Any:
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
        if started is None and self._write(lambda: self.store.hold_back(command_id, attempt)):
            self.dropped["paused"] += 1
            log.info("%s %s attempt %s: paused before it started; back to pending", task.name, command_id, attempt)
            return None
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
        if status is not None:
            self.outbox.report_failure(command_id, name, attempt, "not_found", error, final=status == "failed")

    # -- the attempt ----------------------------------------------------------------------

    def _run(self, task: Any, started: Started) -> Any:
        guard = _Guard(started.timeout)
        ctx = CommandContext(
            started.id,
            started.name,
            started.target,
            started.attempt,
            started.retries,
            started.retries_left,
            _heartbeat=lambda seconds: self._heartbeat(started, guard, seconds),
            _cancel_requested=lambda: self.store.cancel_requested(started.id, started.attempt),
        )
        _set(ctx)
        handler = handler_of(task)
        try:
            args, kwargs = decode_arguments(handler.signature, handler.hints, started.input)
        except Exception as exc:  # the stored input cannot feed this handler: retrying will not help
            self._fail(task, started, "failure", error_of(exc))
            _set(None)
            return None
        interrupted: type[BaseException] | None = None
        result: Any = None
        error: BaseException | None = None
        key = RUNNING.add(self, started, guard)
        try:
            try:
                with guard:
                    result = handler.run(*args, **kwargs)
            finally:
                _set(None)
                RUNNING.remove(key)
            interrupted = guard.fired
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
            return self._canceled(task, started)
        if interrupted is CommandTimeout:
            message = f"the handler ran past its timeout of {started.timeout:g}s"
            return self._failed(task, started, "timeout", ErrorInfo("CommandTimeout", message))
        assert error is not None
        return self._failed(task, started, "failure", error_of(error))

    def _heartbeat(self, started: Started, guard: _Guard, seconds: float | None) -> None:
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

    def _canceled(self, task: Any, started: Started) -> None:
        try:
            children = self.outbox.chained_rows(task.name, "if_canceled", Outcome(started.id, task.name, started.input))
        except Exception:
            log.exception("if_canceled hook of %s raised; recording the cancellation without its chain", task.name)
            children = []
        recorded = self._write(lambda: self.store.canceled(started.id, started.attempt, children))
        self._log_fenced(recorded, started, "canceled")

    def _succeeded(self, task: Any, started: Started, result: Any) -> Any:
        try:
            output = encode(result, f"output of {task.name}")
            check_size(output, self.settings.max_input_bytes, f"output of {task.name}")
            children = Plan.of(
                self.outbox.chained_rows(task.name, "then", Outcome(started.id, task.name, started.input, result))
            )
            if started.chain:  # the next step of a durable chain, with this output as its first argument
                children.extend(next_in_chain(started.chain, output, started.id, started.tenant))
        except Exception as exc:  # a bad output or a failing hook fails the attempt: no parent without children
            return self._failed(task, started, "failure", error_of(exc))
        write_back = self.write_back
        if not children and started.batch_id is None and write_back is not None:
            write_back.submit(started, output)
            return output
        recorded = self._write(lambda: self.store.complete(started.id, started.attempt, output, children))
        self._log_fenced(recorded, started, "completed")
        return output

    def _failed(self, task: Any, started: Started, outcome: str, error: ErrorInfo) -> None:
        if started.retries_left > 0:
            retry_number = started.retries - started.retries_left + 1
            delay = self._delay(task, retry_number, error.type)
            recorded = self._write(lambda: self.store.retry(started.id, started.attempt, outcome, error, delay))
            self._log_fenced(recorded, started, f"retried in {delay:.2f}s")
            if recorded:
                self.outbox.report_failure(started.id, started.name, started.attempt, outcome, error, final=False)
            return
        self._fail(task, started, outcome, error)

    def _fail(self, task: Any, started: Started, outcome: str, error: ErrorInfo) -> None:
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
        if recorded:
            self.outbox.report_failure(started.id, started.name, started.attempt, outcome, error, final=True)

    def _delay(self, task: Any, retry_number: int, error_type: str) -> float:
        policy = getattr(task, "outbox_backoff", None) or self.outbox.backoff
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


#: Most successes one write-back transaction records.
WRITE_BACK_BATCH = 500
#: Longest the write-back waits, after a success arrives, for more to share its commit.
WRITE_BACK_HOLD = 0.005
#: Longest the interpreter's exit waits for the write-back to write what it holds.
WRITE_BACK_EXIT_SECONDS = 5.0


class _WriteBack:
    """A worker process's successes without chained commands or a batch, written behind its handlers.

    The handler's thread hands its success over and takes its next message at once; a
    thread of its own writes the successes handed over in one durable transaction and
    one round trip (:meth:`Store.complete_many`), each batch ``WRITE_BACK_HOLD`` after
    its first success at most (sooner once ``WRITE_BACK_BATCH`` are held). So a prefork
    or solo process does not wait for one command's WAL flush before it starts the next,
    and the few milliseconds of hold let the successes of one handler thread share a
    commit too, as those of many threads do. Until it is written a success is only in
    this process: if the process dies first, the attempt's lease lapses and the rescuer
    retries it, as for a worker that died during the handler (at least once). A warm
    shutdown, and the interpreter's exit, write what is held at once.
    """

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)  # successes arrived, or a write ended
        self._held: list[tuple[Started, Any]] = []
        self._writing = False
        self._flushing = 0  # flush() callers waiting: write without the hold
        self._since = 0.0  # when the oldest held success was handed over
        self._thread = threading.Thread(target=self._run, name="orch-outbox-write-back", daemon=True)
        self._thread.start()
        # A cold shutdown sends no worker_shutdown: the interpreter's exit still writes what is held.
        atexit.register(self._flush_at_exit)

    def submit(self, started: Started, output: Any) -> None:
        """Hand over a success; the write-back thread records it (fenced) as soon as it can."""
        with self._lock:
            if not self._held:
                self._since = time.monotonic()
            self._held.append((started, output))
            self._written.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every success handed over is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._flushing += 1
            self._written.notify_all()
            try:
                while self._held or self._writing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._written.wait(left)
            finally:
                self._flushing -= 1
        return True

    def _flush_at_exit(self) -> None:
        if os.getpid() == self.pid:
            self.flush(WRITE_BACK_EXIT_SECONDS)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._held:
                    self._written.wait()
                ready = self._since + WRITE_BACK_HOLD
                while len(self._held) < WRITE_BACK_BATCH and not self._flushing:
                    left = ready - time.monotonic()
                    if left <= 0:
                        break
                    self._written.wait(left)
                batch, self._held = self._held[:WRITE_BACK_BATCH], self._held[WRITE_BACK_BATCH:]
                self._writing = True
            try:
                self._record(batch)
            finally:
                with self._lock:
                    self._writing = False
                    self._written.notify_all()

    def _record(self, batch: list[tuple[Started, Any]]) -> None:
        executor = self.executor
        items = [(started.id, started.attempt, output) for started, output in batch]
        try:
            recorded = executor._write(lambda: executor.store.complete_many(items))
        except Exception:  # the database stayed away: the leases lapse and the rescuer retries the attempts
            log.exception("could not record %d completion(s); their attempts will be retried", len(batch))
            return
        for started, _ in batch:
            executor._log_fenced(started.id in recorded, started, "completed")


def _parse_header(header: Any) -> tuple[uuid.UUID, int, float] | None:
    try:
        raw_id, attempt, timeout = header
        fence = (uuid.UUID(str(raw_id)), int(attempt), float(timeout))
    except (TypeError, ValueError):
        return None
    return fence if fence[1] >= 1 and fence[2] > 0 else None
