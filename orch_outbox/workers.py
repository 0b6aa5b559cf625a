"""This worker in the registry: it registers at start, renews its row from a thread, and leaves at warm shutdown.

One row per worker (the main process, on behalf of its pool processes), keyed by its
Celery nodename (the ``worker`` of every attempt it starts, as Flower shows it): host,
pid, pool, concurrency, queues, job capacity, version, started, last seen, and an
incarnation tag that each start draws anew.

A row that stops renewing for ``outbox_worker_timeout`` marks its worker dead: the reaper
(``reaper.py``) returns what it held. A worker restarted under the same nodename replaces
its row and returns at once what its earlier incarnation still held. A worker that was
only cut off and comes back finds its row gone: it registers again, and its attempts,
returned meanwhile, are fenced off (the lease renewal of ``running.py`` stops their handlers).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import StoreUnavailable

if TYPE_CHECKING:
    from .settings import Settings
    from .store import Store

log = logging.getLogger("orch_outbox.workers")

VERSION = "0.1.0"


@dataclass(frozen=True)
class Identity:
    """What a worker says of itself in the registry."""

    name: str
    incarnation: str
    hostname: str
    pid: int
    pool: str
    concurrency: int
    queues: tuple[str, ...]
    max_jobs: int

    @classmethod
    def of(cls, nodename: str, pool: str, concurrency: int, queues: Sequence[str], max_jobs: int) -> Identity:
        """A new incarnation of the worker ``nodename`` in this process."""
        return cls(
            nodename,
            uuid.uuid4().hex,
            socket.gethostname(),
            os.getpid(),
            pool,
            concurrency,
            tuple(queues),
            max_jobs,
        )

    def row(self, started_at: object) -> dict[str, object]:
        """The registry row (``last_seen_at`` is set by the store)."""
        return {
            "name": self.name,
            "incarnation": self.incarnation,
            "hostname": self.hostname,
            "pid": self.pid,
            "pool": self.pool,
            "concurrency": self.concurrency,
            "queues": list(self.queues),
            "max_jobs": self.max_jobs,
            "version": VERSION,
            "started_at": started_at,
        }


#: ``replaced(previous row, this incarnation's start)``: an earlier incarnation's row was replaced.
Replaced = Callable[[dict[str, Any], Any], object]

#: ``beat(connected, cut_off_for)`` after every renewal: whether it reached the database, and
#: for how many seconds no renewal has (0.0 right after one did).
Beat = Callable[[bool, float], None]


class Presence:
    """Keeps one worker's registry row alive from a thread of its own."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        identity: Identity,
        beat: Beat | None = None,
        replaced: Replaced | None = None,
    ) -> None:
        self.store = store
        self.replaced = replaced
        self.settings = settings
        self.identity = identity
        self.beat = beat
        self.stop_event = threading.Event()
        #: monotonic time the last renewal that reached the database was started
        self.last_renewed = time.monotonic()
        self.registered = False
        self._started_at: object = None
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.identity.name

    def start(self) -> None:
        """Register (or keep trying from the thread) and renew every ``outbox_worker_heartbeat`` seconds."""
        self.beat_once()
        self._thread = threading.Thread(target=self._run, name="orch-outbox-presence", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(self.settings.worker_heartbeat):
            try:
                self.beat_once()
            except Exception as exc:  # the thread must live on: the worker's attempts depend on its row
                log.warning("worker registry: renewal of %s failed (%s); trying again", self.name, exc)

    def beat_once(self) -> bool:
        """One renewal (a registration the first time, or after the row was reaped); True if it reached the database."""
        began = time.monotonic()
        try:
            if not self.registered:
                self._register()
            elif not self.store.renew_worker(self.name, self.identity.incarnation):
                log.warning(
                    "worker registry: %s was judged dead (no renewal for %ss) and what it ran was returned, "
                    "or another worker runs under its nodename; registering again",
                    self.name,
                    self.settings.worker_timeout,
                )
                self._register()
            self.last_renewed = began
            connected = True
        except StoreUnavailable as exc:
            log.warning("worker registry: cannot renew %s: %s", self.name, exc)
            connected = False
        if self.beat is not None:
            self.beat(connected, 0.0 if connected else time.monotonic() - self.last_renewed)
        return connected

    def _register(self) -> None:
        if self._started_at is None:
            self._started_at = self.store.now()
        previous = self.store.register_worker(self.identity.row(self._started_at))
        self.registered = True
        if previous is not None and previous["incarnation"] != self.identity.incarnation and self.replaced:
            self.replaced(previous, self._started_at)
        log.info("worker registry: %s registered (queues %s)", self.name, ", ".join(self.identity.queues))

    def leave(self, timeout: float = 5.0) -> None:
        """Stop renewing and remove the row (warm shutdown)."""
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.store.forget_worker(self.name, self.identity.incarnation)
        except Exception as exc:  # unreachable, or the tables are gone: the reaper removes the row
            log.warning("worker registry: could not remove %s (%s); it will be reaped", self.name, exc)
