"""The attempts running in one worker process: their timeouts, their leases, their cancellations.

- :class:`Guard` delivers a timeout or a cancellation into the handler's thread (one
  thread per process fires every deadline, see :class:`Deadlines`).
- :class:`Running` keeps the attempts of this process. Once a second, for the attempts
  older than a second (short ones cost nothing), one statement renews their leases and
  reads their cancellations (:meth:`Store.renew`): a handler need not heartbeat to keep
  its lease, and the rescuer acts only on attempts whose process stopped renewing. An
  attempt the database no longer gives to this process (rescued while this worker was
  cut off, or finished otherwise) is interrupted with :class:`LeaseLost`.
- The watchdog: in a prefork child, a handler still running ``outbox_timeout_grace``
  after its timeout (blocked in a C call that never saw the timeout) has its timeout
  recorded and then its child process ended, so no second attempt ever starts while it
  runs. Threads and solo pools cannot end a thread: there the lease is renewed while the
  thread is still inside the handler, and the timeout is recorded when it returns.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import CommandCanceled, CommandTimeout, LeaseLost
from .pid import current as current_pid

log = logging.getLogger("orch_outbox.running")

#: Seconds between the lease renewals (and cancel checks) of one worker process.
CANCEL_POLL_SECONDS = 1.0
#: Longest the timeouts thread sleeps before it looks at the deadlines again (shorter ones wake it).
LOOK_SECONDS = 1.0


class Deadlines:
    """One thread per process fires every handler timeout (a Timer thread per attempt costs too much).

    A guard that starts or ends only sets or drops its own entry (no lock: a dict's item
    assignment is atomic), so the handlers of a threads pool do not queue on a shared lock
    for each command. The thread sleeps until the earliest deadline it knows of, at most
    ``LOOK_SECONDS``, then looks at every live guard; a guard whose deadline falls before
    that wakes it (rare: a timeout shorter than a second, or a heartbeat's shorter extension).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._live: dict[Guard, None] = {}
        self._thread: threading.Thread | None = None
        self._thread_pid = 0  # the process that started the thread
        #: when the thread wakes on its own; inf while it looks (then every new deadline pokes it)
        self._wake_at = math.inf
        self._poked = False  # a deadline arrived while the thread looked: it looks again before it sleeps

    def schedule(self, guard: Guard, at: float) -> None:
        """Watch ``guard``, due at monotonic time ``at`` (its ``deadline``); again after an extension."""
        self._live[guard] = None
        if self._thread_pid != current_pid():  # none yet in this process (a forked child starts without it)
            with self._cond:
                if self._thread_pid != current_pid():
                    self._wake_at = math.inf
                    self._thread = threading.Thread(target=self._run, name="orch-outbox-timeouts", daemon=True)
                    self._thread.start()
                    self._thread_pid = current_pid()
        if at < self._wake_at:  # the thread sleeps past this deadline (or is looking): it must look again
            with self._cond:
                self._poked = True
                self._cond.notify()

    def finished(self, guard: Guard) -> None:
        """A guard ended: no longer watched."""
        self._live.pop(guard, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._poked = False
                self._wake_at = math.inf
            nearest = self._fire_due()
            with self._cond:
                if self._poked:
                    continue
                self._wake_at = nearest
                left = nearest - time.monotonic()
                if left > 0:
                    self._cond.wait(left)

    def _fire_due(self) -> float:
        """Interrupt every live guard past its deadline; the next deadline (``LOOK_SECONDS`` from now at most)."""
        now = time.monotonic()
        nearest = now + LOOK_SECONDS
        for guard in list(self._live):
            deadline = guard.deadline
            if deadline > now:
                nearest = min(nearest, deadline)
                continue
            try:
                guard.expire(now)
            except Exception:  # never let the thread die: every handler's timeout in this process depends on it
                log.exception("delivering a handler's timeout failed")
        return nearest


DEADLINES = Deadlines()


class Guard:
    """Delivers an exception into the handler's thread: its timeout, or a cancellation.

    The exception is delivered at the handler's next Python bytecode; a handler blocked
    inside C code sees it when the call returns. Under the prefork pool, the watchdog
    (:class:`Running`) ends the child of a handler that has not returned
    ``outbox_timeout_grace`` after its timeout.
    """

    def __init__(self, seconds: float) -> None:
        self.thread_id = threading.get_ident()
        self.started = time.monotonic()
        self.fired: type[BaseException] | None = None
        self._lock = threading.Lock()
        self._active = False
        self._seconds = seconds
        #: monotonic time the handler's timeout falls due (moved by heartbeats)
        self.deadline = self.started + seconds

    def __enter__(self) -> Guard:
        with self._lock:
            self._active = True
            self.deadline = time.monotonic() + self._seconds
        DEADLINES.schedule(self, self.deadline)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active = False
            if self.fired:  # clear an exception not yet delivered: the handler already returned
                _async_raise(self.thread_id, None)
        DEADLINES.finished(self)

    def extend(self, seconds: float) -> None:
        """Move the timeout to ``seconds`` from now."""
        with self._lock:
            if not self._active or self.fired:
                return
            self.deadline = time.monotonic() + seconds
        DEADLINES.schedule(self, self.deadline)

    def expire(self, now: float) -> None:
        """The timeouts thread's look at ``now``: the timeout, if the deadline passed (an extension moves it)."""
        with self._lock:
            due = self._active and not self.fired and self.deadline <= now
        if due:
            self.interrupt(CommandTimeout)

    def interrupt(self, kind: type[BaseException]) -> bool:
        """Raise ``kind`` in the handler's thread, once; False if it returned or was interrupted already."""
        with self._lock:
            if not self._active or self.fired:
                return False
            self.fired = kind
            _async_raise(self.thread_id, kind)
            return True


class Cooperative(Guard):
    """A job's guard: no deadline, and a stop is a flag the handler reads, never an exception thrown in.

    A job is asked to stop (canceled, its hold lost, its worker shutting down) through
    :attr:`stopped`, which ``current().canceled`` reads and ``current().heartbeat()``
    turns into :class:`CommandCanceled`; :attr:`fired` keeps the first reason.
    """

    def __init__(self) -> None:
        super().__init__(0.0)
        self.stopped = threading.Event()

    def __enter__(self) -> Guard:
        with self._lock:
            self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active = False

    def extend(self, seconds: float) -> None:
        """A job has no deadline to move."""

    def interrupt(self, kind: type[BaseException]) -> bool:
        with self._lock:
            if not self._active or self.fired:
                return False
            self.fired = kind
            self.stopped.set()
            return True


def _async_raise(thread_id: int, kind: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), None if kind is None else ctypes.py_object(kind)
    )


@dataclass
class Entry:
    """One attempt running in this process."""

    command_id: uuid.UUID
    attempt: int
    guard: Guard
    #: renews the leases of these attempts: ``renew(pairs) -> {pair: cancel requested}`` (the store's)
    renew: Callable[[list[tuple[uuid.UUID, int]]], dict[tuple[uuid.UUID, int], bool]]
    #: records the attempt as timed out on behalf of a handler that never returned (the watchdog)
    stuck: Callable[[], None]
    #: seconds past the deadline before the watchdog acts
    grace: float


class Running:
    """The attempts running in this process, keyed ``"<command id>:<attempt>"``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._watcher: threading.Thread | None = None
        self._watcher_pid = 0  # the process that started the watcher
        #: set in a prefork child (``worker_process_init``): only there may the watchdog end the process
        self.in_pool_child = False

    def add(self, entry: Entry) -> str:
        key = f"{entry.command_id}:{entry.attempt}"
        self._entries[key] = entry  # atomic: the handlers of a threads pool do not queue on a lock per command
        if self._watcher_pid != current_pid():  # none yet in this process (a forked child starts without it)
            with self._lock:
                if self._watcher_pid != current_pid():
                    self._watcher = threading.Thread(target=self._watch, name="orch-outbox-leases", daemon=True)
                    self._watcher.start()
                    self._watcher_pid = current_pid()
        return key

    def remove(self, key: str) -> None:
        self._entries.pop(key, None)

    def interrupt(self, task_id: str) -> bool:
        """Cancel the attempt ``"<id>:<attempt>"``, or any attempt of the command ``"<id>"``, running here."""
        entries = [e for k, e in self._running() if k == task_id or k.split(":", 1)[0] == task_id]
        return any([e.guard.interrupt(CommandCanceled) for e in entries])

    def _watch(self) -> None:
        while True:
            time.sleep(CANCEL_POLL_SECONDS)
            try:
                self.check_once()
            except Exception:  # never let the thread die: the leases of this process depend on it
                log.exception("lease watch failed; trying again in %ss", CANCEL_POLL_SECONDS)

    def check_once(self) -> None:
        """Renew the leases of attempts older than a poll interval; interrupt canceled or lost ones; stop stuck ones."""
        now = time.monotonic()
        old = [e for _, e in self._running() if now - e.guard.started >= CANCEL_POLL_SECONDS]
        by_store: dict[Any, list[Entry]] = {}
        for entry in old:
            by_store.setdefault(entry.renew, []).append(entry)
        for renew, entries in by_store.items():
            try:
                held = renew([(e.command_id, e.attempt) for e in entries])
            except Exception as exc:  # the database is away: the leases last lock_buffer; look again later
                log.debug("lease renewal: %s", exc)
                continue
            for e in entries:
                pair = (e.command_id, e.attempt)
                if pair not in held:
                    if e.guard.interrupt(LeaseLost):
                        log.warning("command %s attempt %s: no longer held by this worker; stopping it", *pair)
                elif held[pair] and e.guard.interrupt(CommandCanceled):
                    log.info("command %s attempt %s: canceled while running; interrupting", *pair)
        if self.in_pool_child:
            for e in old:
                if e.guard.fired is CommandTimeout and now > e.guard.deadline + e.grace and self._still(e):
                    self._end_child(e)

    def _still(self, entry: Entry) -> bool:
        return any(e is entry for _, e in self._running())

    def _running(self) -> list[tuple[str, Entry]]:
        """The entries now (copied in one step: handlers add and remove theirs without a lock)."""
        return list(self._entries.items())

    def _end_child(self, entry: Entry) -> None:
        log.error(
            "command %s attempt %s: the handler is still running %.0fs after its timeout; "
            "recording the timeout and ending this pool process",
            entry.command_id,
            entry.attempt,
            entry.grace,
        )
        try:
            entry.stuck()
        finally:
            os.kill(os.getpid(), signal.SIGKILL)


RUNNING = Running()
