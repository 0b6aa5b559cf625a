"""Starts in the worker's consumer (``outbox_start_in_consumer``, off by default): claimed for the pool.

By default each pool process (or thread) claims its attempt itself (dispatched → running)
right before the handler runs, and waits for that round trip while a core sits idle. With
the option on, the worker's main process hands every outbox message it receives to a
thread of its own, the *starter*, which claims all the attempts waiting for it in one
round trip (one statement per attempt, one pipeline, one commit) and only then passes the
messages to the pool. The claim is the same fenced statement; a pool process whose message
carries a fresh claim runs the handler at once.

The trade, and why it is off by default: a message the worker has received (Celery
prefetches ``worker_prefetch_multiplier`` times its concurrency) is ``running`` from then on, so a
cancel or a pause reaches it as it reaches a running attempt: a cancel interrupts the
handler (or, if it returns first, the command completes), a pause no longer holds it back.
By default both reach every message not yet in a handler.

- A message whose claim was refused (duplicate, late, paused, expired), or that could
  not be claimed (the database away), goes to the pool without a claim: the pool process
  claims it itself as before, and reports why it ran nothing.
- A claim that waited in the pool's queue longer than :data:`FRESH_SECONDS` is checked
  again by the pool process before the handler runs (and its lease renewed), so a
  message that waited behind long handlers never runs an attempt it no longer holds.
- At warm shutdown the attempts claimed for messages no pool process took are put back
  to ``dispatched``: their messages, redelivered by the broker, start them again.

Used with the prefork pool (on the event loop, kombu ≥ 5.7 for its thread-safe
``call_soon``) and the threads pool; the solo pool and green pools start in the handler's
own thread, as before.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.worker.strategy import default as default_strategy

from .store import Started, Store

log = logging.getLogger("orch_outbox.starting")

#: Longest a claim made by the starter is trusted without a second look by the pool process.
FRESH_SECONDS = 1.0
#: Seconds between the starter's renewals of the leases of claims still waiting for a pool process.
RENEW_SECONDS = 1.0
#: Most attempts one round trip of the starter claims.
START_BATCH = 200
#: The request-dict key carrying a claim to the pool process: (monotonic time of the claim, Started's fields).
CLAIM_KEY = "outbox_started"

#: Per app: makes (or returns) the starter of this worker process for a consumer, or None when it cannot be used.
STARTERS: weakref.WeakKeyDictionary[Celery, Callable[[Any], Starter | None]] = weakref.WeakKeyDictionary()
#: Per app: the starter running in this process, if any.
ACTIVE: weakref.WeakKeyDictionary[Celery, Starter] = weakref.WeakKeyDictionary()


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """The message strategy of outbox tasks: Celery's own, with the pool's hand-over going through the starter."""
    factory = STARTERS.get(app)
    starter = factory(consumer) if factory is not None else None
    if starter is None:
        return default_strategy(task, app, consumer, **kwargs)
    handle = consumer.on_task_request
    # Celery's strategy reads ``on_task_request`` once, here: it captures the starter's hand-over.
    consumer.on_task_request = lambda request: starter.submit(request, handle)
    try:
        return default_strategy(task, app, consumer, **kwargs)
    finally:
        consumer.on_task_request = handle


def pool_kind(consumer: Any) -> str | None:
    """``prefork`` (on an event loop with a thread-safe ``call_soon``), ``threads``, or None (not used)."""
    module = type(getattr(consumer, "pool", None)).__module__
    hub = getattr(consumer, "hub", None)
    if module == "celery.concurrency.prefork" and hub is not None and hasattr(hub, "_ready_lock"):
        return "prefork"
    if module == "celery.concurrency.thread":
        return "threads"
    return None


def accepted(app: Any, request_dict: dict[str, Any]) -> None:
    """A pool process took a message (Celery's ``on_accepted``, in the main process): its claim no longer waits."""
    carried = request_dict.get(CLAIM_KEY)
    starter = ACTIVE.get(app) if carried else None
    if starter is not None and carried:
        starter.accepted(carried[1], carried[4])


def claim_of(request: Any) -> tuple[float, Started] | None:
    """The starter's claim a pool process received with its message: (monotonic time of the claim, the row)."""
    carried = getattr(request, CLAIM_KEY, None)
    if not carried:
        return None
    return carried[0], Started(*carried[1:])


class Starter:
    """The worker main process's starter thread (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        parse: Callable[[Any], tuple[uuid.UUID, int, float] | None],
        lock_buffer: float,
        worker_name: Callable[[], str | None],
        hub: Any = None,
        dispatch_timeout: float = 60.0,
    ) -> None:
        self._store = store
        self._parse = parse
        self._lock_buffer = lock_buffer
        self._worker_name = worker_name
        self._hub = hub
        self._dispatch_timeout = dispatch_timeout
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: list[tuple[Any, Callable[[Any], Any]]] = []
        self._ready: collections.deque[tuple[Any, Callable[[Any], Any]]] = collections.deque()
        #: attempts claimed for requests no pool process took yet: (id, attempt) -> monotonic time of the claim
        self._waiting: dict[tuple[uuid.UUID, int], float] = {}
        self._renewed = time.monotonic()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="orch-outbox-starter", daemon=True)
        self._thread.start()

    def submit(self, request: Any, handle: Callable[[Any], Any]) -> None:
        """Take a request Celery would hand to its pool now; the pool gets it once its attempt is claimed."""
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self._pending.append((request, handle))
                self._wake.notify()
        if stopped:  # shutting down: the pool process claims it itself, if it still runs at all
            handle(request)

    def accepted(self, command_id: uuid.UUID, attempt: int) -> None:
        """A pool process took the message of this attempt (Celery's ``on_accepted``), or it ended without one."""
        with self._lock:
            self._waiting.pop((command_id, attempt), None)

    def stop(self) -> int:
        """Warm shutdown: no more claims; attempts claimed for messages never taken go back to ``dispatched``."""
        with self._lock:
            self._stopped = True
            self._wake.notify()
            waiting, self._waiting = list(self._waiting), {}
        if not waiting:
            return 0
        try:
            returned = self._store.unstart(waiting, self._dispatch_timeout)
        except Exception as exc:  # their leases lapse and the rescuer returns them
            log.warning("could not return %d claimed attempt(s) at shutdown: %s", len(waiting), exc)
            return 0
        log.info("returned %d claimed attempt(s) that no pool process took to dispatched", returned)
        return returned

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending and not self._stopped:
                    self._wake.wait(RENEW_SECONDS if self._waiting else None)
                batch, self._pending = self._pending[:START_BATCH], self._pending[START_BATCH:]
                stopped = self._stopped
            if batch:
                self._claim(batch)
                self._deliver(batch)
            elif stopped:
                return
            if time.monotonic() - self._renewed >= RENEW_SECONDS:
                self._renew()

    def _renew(self) -> None:
        """Keep the leases of claims waiting in the pool's queue (behind long handlers) from lapsing.

        A claim the database no longer gives this worker (canceled, or rescued while the
        database was away) stays in the pool's queue: its pool process checks it again
        before running anything (see ``Executor._claimed``).
        """
        now = self._renewed = time.monotonic()
        with self._lock:
            due = [key for key, at in self._waiting.items() if now - at >= RENEW_SECONDS]
        if not due:
            return
        try:
            held = self._store.renew(due, self._lock_buffer)
        except Exception as exc:  # the next pass tries again; the leases hold for lock_buffer meanwhile
            log.warning("could not renew %d waiting claim(s): %s", len(due), exc)
            return
        lost = [key for key in due if key not in held]
        if lost:
            with self._lock:
                for key in lost:
                    self._waiting.pop(key, None)

    def _claim(self, batch: list[tuple[Any, Callable[[Any], Any]]]) -> None:
        items, requests = [], []
        worker = self._worker_name() or "unknown"
        for request, _ in batch:
            fence = self._parse(request.request_dict.get("outbox"))
            if fence is None:
                continue
            command_id, attempt, timeout = fence
            items.append((command_id, attempt, request.name, worker, timeout + self._lock_buffer))
            requests.append(request)
        if not items:
            return
        try:
            rows = self._store.start_many(items)
        except Exception as exc:  # the pool processes claim for themselves, with their retries
            log.warning("could not claim %d attempt(s) for the pool: %s", len(items), exc)
            return
        now = time.monotonic()
        with self._lock:
            for request, row in zip(requests, rows, strict=True):
                if row is not None:
                    request.request_dict[CLAIM_KEY] = (now, *_fields(row))
                    self._waiting[(row.id, row.attempt)] = now

    def _deliver(self, batch: list[tuple[Any, Callable[[Any], Any]]]) -> None:
        if self._hub is None:  # the threads pool: its executor takes work from any thread
            for request, handle in batch:
                self._hand_over(request, handle)
            return
        with self._lock:
            self._ready.extend(batch)
        self._hub.call_soon(self._drain)  # the prefork pool is driven by the event loop's thread

    def _hand_over(self, request: Any, handle: Callable[[Any], Any]) -> None:
        try:
            handle(request)
        except Exception:  # as Celery's own consumer loop would: log, and go on with the next message
            log.exception("could not hand %s[%s] to the pool", request.name, request.id)
        claim = request.request_dict.get(CLAIM_KEY)
        if claim and getattr(request, "_already_revoked", False):  # Celery revoked it: no pool process will run it
            self.accepted(claim[1], claim[4])
            try:
                self._store.unstart([(claim[1], claim[4])], self._dispatch_timeout)
            except Exception as exc:  # its lease lapses and the rescuer returns it
                log.warning("could not return the claim of revoked %s[%s]: %s", request.name, request.id, exc)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._ready:
                    return
                request, handle = self._ready.popleft()
            self._hand_over(request, handle)


def _fields(row: Started) -> tuple[Any, ...]:
    return tuple(getattr(row, name) for name in _STARTED_FIELDS)


_STARTED_FIELDS = tuple(field.name for field in dataclasses.fields(Started))
