"""The write-back: a worker process's plain successes, recorded behind its handlers in shared commits."""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import StoreUnavailable
from .pid import current as current_pid
from .store import Started, Store

log = logging.getLogger("orch_outbox.executor")

#: Most successes one write-back transaction records.
WRITE_BACK_BATCH = 500
#: Longest the write-back waits, after a success arrives, for more to share its commit.
WRITE_BACK_HOLD = 0.02
#: How much longer than the hold the write-back's own thread lets successes wait for a handler's thread to write
#: them (see :class:`WriteBack`): it looks that often while the handlers run, and each look takes the GIL from them.
IDLE_HOLDS = 3
#: Longest the interpreter's exit waits for the write-back to write what it holds.
WRITE_BACK_EXIT_SECONDS = 5.0


class WriteBack:
    """A worker process's successes without chained commands or a batch, written behind its handlers.

    The handler's thread hands its success over and takes its next message at once. The
    successes handed over are written together in one durable transaction and one round
    trip (:meth:`Store.complete_many`) once the oldest has waited ``WRITE_BACK_HOLD``
    (sooner once ``WRITE_BACK_BATCH`` are held), so a process does not wait for one
    command's WAL flush before it starts the next, and the successes of many commands
    share a commit.

    Who writes them. In a process that runs one handler at a time (prefork, solo), that
    handler's thread, right before it starts its next attempt (:meth:`write_due`); the
    write-back's own thread only when nothing else did, ``IDLE_HOLDS`` holds after the
    first success (the process went idle). A second thread writing while the handler runs
    takes the GIL from it a few times per round trip: measured on prefork children, that
    GIL ping-pong cost more CPU than the write itself. In a threads pool, whose handlers
    share the GIL anyway, the write-back's thread writes each batch when it is due.

    Until it is written a success is only in this process: if the process
    dies first, the attempt's lease lapses and the rescuer retries it, as for a worker that
    died during the handler (at least once). A warm shutdown, and the interpreter's exit,
    write what is held at once.
    """

    def __init__(
        self,
        store: Store,
        write: Callable[[Callable[[], Any]], Any],
        recorded: Callable[[bool, Started], None],
        handlers_write: bool = False,
    ) -> None:
        """``handlers_write``: the process runs one handler at a time, whose thread writes what is due (prefork,
        solo); otherwise (threads) the write-back's own thread writes every batch, ``WRITE_BACK_HOLD`` after its
        first success."""
        self._store = store
        self.handlers_write = handlers_write
        self._write_with_retries = write
        self._on_recorded = recorded
        self.pid = current_pid()
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)  # successes arrived, or a write ended
        self._held: list[tuple[Started, Any]] = []
        #: a batch the handler's thread sent without waiting for its commit, and how to read its answer
        self._sent: tuple[list[tuple[Started, Any]], Callable[[], set[Any]]] | None = None
        self._writing = 0  # writes under way (a handler's thread, the write-back's own)
        self._flushing = 0  # flush() callers waiting: write without the hold
        self._since = 0.0  # when the oldest held success was handed over
        self._wake_at = 0.0  # when the thread looks next on its own (inf: asleep until woken)
        self._thread = threading.Thread(target=self._run, name="orch-outbox-write-back", daemon=True)
        self._thread.start()
        # A cold shutdown sends no worker_shutdown: the interpreter's exit still writes what is held.
        atexit.register(self._flush_at_exit)

    def submit(self, started: Started, output: Any) -> None:
        """Hand over a success; it is recorded (fenced) with the others held, once they are due."""
        with self._lock:
            held = self._held
            if not held:
                self._since = time.monotonic()
            held.append((started, output))
            # The thread looks on its own by then; otherwise (asleep, or a look planned later) it is woken.
            late = len(held) == 1 and self._wake_at > self._since + self._idle_hold()
            if late or len(held) >= WRITE_BACK_BATCH:
                self._written.notify_all()

    def write_due(self) -> None:
        """On a handler's thread, before its next start: send the successes held, if they are due.

        The batch goes out without waiting for its commit (the start does not wait for the
        WAL flush); its answer is read when the next batch is due, or by a flush, or by the
        write-back's thread once the process is idle.
        """
        if not self.handlers_write or not self._held or time.monotonic() - self._since < WRITE_BACK_HOLD:
            return
        self._answer()
        with self._lock:
            batch = self._take(WRITE_BACK_HOLD)
        if not batch:
            return
        items = [(started.id, started.attempt, output) for started, output in batch]
        try:
            self._sent = (batch, self._store.complete_many_soon(items))
        except Exception:  # not sent (the database is away): written with retries, waiting
            self._write(batch)

    def _answer(self) -> None:
        """Read the answer of the batch sent last without waiting (if any), and count it written."""
        with self._lock:
            sent, self._sent = self._sent, None
        if sent is None:
            return
        batch, recorded = sent
        try:
            try:
                done = recorded()
            except StoreUnavailable:  # its commit is unknown: written again (fenced: a recorded one is not redone)
                self._record(batch, again=True)
                return
            except Exception:
                log.exception("could not record %d completion(s); their attempts will be retried", len(batch))
                return
            for started, _ in batch:
                self._on_recorded(started.id in done, started)
        finally:
            self._wrote()

    def flush(self, timeout: float) -> bool:
        """Wait until every success handed over is written; False on timeout."""
        deadline = time.monotonic() + timeout
        self._answer()
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

    def _idle_hold(self) -> float:
        """How long the write-back's own thread leaves the oldest success held before it writes it."""
        return (IDLE_HOLDS if self.handlers_write else 1) * WRITE_BACK_HOLD

    def _flush_at_exit(self) -> None:
        if current_pid() == self.pid:
            self.flush(WRITE_BACK_EXIT_SECONDS)

    def _take(self, hold: float) -> list[tuple[Started, Any]]:
        """The due successes (held ``hold`` or more, a full batch, or a flush waiting), counted as being written;
        called with the lock held."""
        held = self._held
        due = held and (self._flushing or len(held) >= WRITE_BACK_BATCH or time.monotonic() - self._since >= hold)
        if not due:
            return []
        batch, self._held = held[:WRITE_BACK_BATCH], held[WRITE_BACK_BATCH:]
        if self._held:
            self._since = time.monotonic()
        self._writing += 1
        return batch

    def _run(self) -> None:
        empty_looks = 0
        while True:
            if self._sent is not None and not self._held:  # the handler's thread went idle after sending
                self._answer()
            with self._lock:
                # While the handlers run, look every IDLE_HOLDS x WRITE_BACK_HOLD without being woken (a wake-up a batch
                # costs the handlers' thread the GIL); once two looks found nothing, sleep until a success arrives.
                while not self._held and not self._sent and empty_looks >= 2:
                    self._wake_at = math.inf
                    self._written.wait()
                    empty_looks = 0
                idle_hold = self._idle_hold()
                batch = self._take(idle_hold)
                if not batch:
                    empty_looks = 0 if self._held or self._sent else empty_looks + 1
                    self._wake_at = (self._since if self._held else time.monotonic()) + idle_hold
                    self._written.wait(max(self._wake_at - time.monotonic(), 0.001))
                    continue
            self._write(batch)

    def _write(self, batch: list[tuple[Started, Any]]) -> None:
        try:
            self._record(batch)
        finally:
            self._wrote()

    def _wrote(self) -> None:
        """A write ended."""
        with self._lock:
            self._writing -= 1
            if self._flushing:  # only a flush waits for a write to end (waking the thread would cost the GIL)
                self._written.notify_all()

    def _record(self, batch: list[tuple[Started, Any]], again: bool = False) -> None:
        """Write a batch, retrying while the database is away; ``again``: it may have been recorded already
        (an answer lost with its connection), so an attempt found no longer running is not reported as fenced."""
        items = [(started.id, started.attempt, output) for started, output in batch]
        try:
            recorded = self._write_with_retries(lambda: self._store.complete_many(items))
        except Exception:  # the database stayed away: the leases lapse and the rescuer retries the attempts
            log.exception("could not record %d completion(s); their attempts will be retried", len(batch))
            return
        for started, _ in batch:
            if started.id in recorded or not again:
                self._on_recorded(started.id in recorded, started)
