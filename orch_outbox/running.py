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
import heapq
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
    """One thread per process fires every handler timeout (a Timer thread per attempt costs too much)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Guard]] = []
        self._seq = 0
        self._finished = 0
        self._thread: threading.Thread | None = None
        self._thread_pid = 0  # the process that started the thread
        self._wake_at = -math.inf  # when the thread wakes on its own (-inf: it is awake, or not started yet)

    def finished(self) -> None:
        """A guard ended before its deadline: drop the ended ones from the head of the heap (handlers mostly end in
        the order they started, so the thread does not wake for them a timeout later), and compact the heap when
        ended entries dominate it."""
        with self._cond:
            self._finished += 1
            heap = self._heap
            while heap and not heap[0][2].pending(heap[0][1]):
                heapq.heappop(heap)
                self._finished = max(self._finished - 1, 0)
            if self._finished > 1000 and self._finished * 2 > len(self._heap):
                self._heap = [entry for entry in self._heap if entry[2].pending(entry[1])]
                heapq.heapify(self._heap)
                self._finished = 0

    def schedule(self, guard: Guard, at: float) -> int:
        """Fire ``guard`` at monotonic time ``at``; returns a token (a later schedule supersedes it)."""
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (at, self._seq, guard))
            if self._thread_pid != current_pid():  # none yet in this process (a forked child starts without it)
                self._thread = threading.Thread(target=self._run, name="orch-outbox-timeouts", daemon=True)
                self._thread.start()
                self._thread_pid = current_pid()
            if at < self._wake_at:  # the thread sleeps past this deadline: it must wake earlier
                self._cond.notify()
            return self._seq

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    # Woken only by a deadline earlier than this one, not by every handler that starts (the
                    # heap is often empty: ended handlers leave it), so it looks again at least once a second.
                    look = time.monotonic() + LOOK_SECONDS
                    self._wake_at = min(self._heap[0][0], look) if self._heap else look
                    self._cond.wait(self._wake_at - time.monotonic())
                self._wake_at = -math.inf  # awake: nobody needs to wake it
                _, token, guard = heapq.heappop(self._heap)
            try:
                guard.expire(token)
            except Exception:  # never let the thread die: every handler's timeout in this process depends on it
                log.exception("delivering a handler's timeout failed")


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
        self._token = 0
        #: monotonic time the handler's timeout falls due (moved by heartbeats)
        self.deadline = self.started + seconds

    def __enter__(self) -> Guard:
        with self._lock:
            self._active = True
            self.deadline = time.monotonic() + self._seconds
            self._token = DEADLINES.schedule(self, self.deadline)
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
                self.deadline = time.monotonic() + seconds
                self._token = DEADLINES.schedule(self, self.deadline)

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
        with self._lock:
            self._entries[key] = entry
            if self._watcher_pid != current_pid():  # none yet in this process (a forked child starts without it)
                self._watcher = threading.Thread(target=self._watch, name="orch-outbox-leases", daemon=True)
                self._watcher.start()
                self._watcher_pid = current_pid()
        return key

    def remove(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def interrupt(self, task_id: str) -> bool:
        """Cancel the attempt ``"<id>:<attempt>"``, or any attempt of the command ``"<id>"``, running here."""
        with self._lock:
            entries = [e for k, e in self._entries.items() if k == task_id or k.split(":", 1)[0] == task_id]
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
        with self._lock:
            old = [e for e in self._entries.values() if now - e.guard.started >= CANCEL_POLL_SECONDS]
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
        with self._lock:
            return entry in self._entries.values()

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
