"""The write-back: a worker process's plain successes, recorded behind its handlers in shared commits."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .store import Started, Store

log = logging.getLogger("orch_outbox.executor")

#: Most successes one write-back transaction records.
WRITE_BACK_BATCH = 500
#: Longest the write-back waits, after a success arrives, for more to share its commit.
WRITE_BACK_HOLD = 0.02
#: Longest the interpreter's exit waits for the write-back to write what it holds.
WRITE_BACK_EXIT_SECONDS = 5.0


class WriteBack:
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

    def __init__(
        self,
        store: Store,
        write: Callable[[Callable[[], Any]], Any],
        recorded: Callable[[bool, Started], None],
    ) -> None:
        self._store = store
        self._write_with_retries = write
        self._on_recorded = recorded
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
            held = self._held
            if not held:
                self._since = time.monotonic()
            held.append((started, output))
            if len(held) == 1 or len(held) >= WRITE_BACK_BATCH:  # the writer waits for the first, or is holding
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
        items = [(started.id, started.attempt, output) for started, output in batch]
        try:
            recorded = self._write_with_retries(lambda: self._store.complete_many(items))
        except Exception:  # the database stayed away: the leases lapse and the rescuer retries the attempts
            log.exception("could not record %d completion(s); their attempts will be retried", len(batch))
            return
        for started, _ in batch:
            self._on_recorded(started.id in recorded, started)
