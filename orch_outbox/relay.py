"""The relay publishes due commands; the rescuer settles leases that lapsed.

Relay, per batch: one transaction claims due rows (pending → dispatched, attempt + 1,
``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and commits; then each row is published as
its command's Celery task to the queue named by its target. A crash after the commit
and before the publish leaves rows dispatched with no message: their dispatch lease
lapses and the rescuer returns them to pending, no retry consumed. A publish that fails
returns the unpublished rows to pending at once.

Rescuer: lapsed dispatch leases go back to pending; lapsed running leases (the worker
died, hung, or ran past timeout + lock buffer) count as a lost attempt: retried while
retries are left, failed (with on-failure commands) after.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from kombu.exceptions import KombuError

from . import backoff as backoff_mod
from .errors import StoreUnavailable
from .store import Dispatch, ErrorInfo
from .task import Outcome

if TYPE_CHECKING:
    from .outbox import Outbox

log = logging.getLogger("orch_outbox.relay")

#: Longest one relay run keeps claiming before it yields to the next tick.
RUN_BUDGET_SECONDS = 5.0
#: kombu retry policy for one publish while the broker is unreachable.
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.5, "interval_max": 1.0}


class Relay:
    """Claims due commands and publishes them as Celery task messages."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.app = outbox.app
        self.store = outbox.store
        self.settings = outbox.settings

    def run_once(self, budget: float = RUN_BUDGET_SECONDS) -> int:
        """Claim and publish batches until none is full or the budget is spent; returns rows published."""
        deadline = time.monotonic() + budget
        published = 0
        while True:
            try:
                batch = self.store.claim(self.settings.batch_size, self.settings.dispatch_timeout)
            except StoreUnavailable as exc:
                log.warning("relay: %s", exc)
                return published
            if not batch:
                return published
            sent = self.publish(batch)
            published += sent
            if sent < len(batch) or len(batch) < self.settings.batch_size or time.monotonic() > deadline:
                return published

    def publish(self, batch: list[Dispatch]) -> int:
        """Publish a claimed batch; on a broker failure, return the unpublished rows to pending."""
        sent = 0
        try:
            with self.app.producer_or_acquire() as producer:
                for item in batch:
                    self._send(producer, item)
                    sent += 1
        except (KombuError, OSError) as exc:
            unsent = batch[sent:]
            log.warning("relay: broker unavailable (%s); %d command(s) stay pending", exc, len(unsent))
            try:
                self.store.undispatch(unsent)
            except StoreUnavailable:
                log.warning("relay: could not return %d row(s) to pending; their dispatch lease will", len(unsent))
        return sent

    def _send(self, producer: object, item: Dispatch) -> None:
        self.app.send_task(
            item.name,
            kwargs=item.input,
            task_id=f"{item.id}:{item.attempt}",
            queue=item.target,
            headers={"outbox": [str(item.id), item.attempt, item.timeout]},
            producer=producer,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
            ignore_result=True,
        )


class Rescuer:
    """Settles dispatch and run leases that lapsed."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.store = outbox.store
        self.settings = outbox.settings

    def run_once(self, limit: int = 500) -> int:
        """One pass over lapsed leases; returns how many rows changed."""
        try:
            changed = self.store.release_lapsed_dispatches(limit)
            for lapsed in self.store.lapsed_runs(limit):
                error = ErrorInfo(
                    "LeaseExpired",
                    f"attempt {lapsed.attempt} stopped reporting: its worker died, hung, "
                    "or ran past timeout + lock buffer",
                )
                if lapsed.retries_left > 0:
                    task = self.outbox.app.tasks.get(lapsed.name)
                    policy = getattr(task, "outbox_backoff", None) or self.outbox.backoff
                    delay = backoff_mod.delay_for(policy, 1, error.type, self.settings.retry_backoff_max)
                    done = self.store.retry(lapsed.id, lapsed.attempt, "lost", error, delay, lapsed_only=True)
                else:
                    children = self.outbox.chained_rows(
                        lapsed.name, "if_failed", Outcome(lapsed.id, lapsed.name, lapsed.input, None, error)
                    )
                    done = self.store.fail(lapsed.id, lapsed.attempt, "lost", error, children, lapsed_only=True)
                changed += int(done)
        except StoreUnavailable as exc:
            log.warning("rescuer: %s", exc)
            return 0
        if changed:
            log.info("rescuer: settled %d lapsed lease(s)", changed)
        return changed


class ListeningRelay:
    """Relays as soon as a transaction that pushed commands commits; polls as the fallback.

    On PostgreSQL an INSERT trigger NOTIFYs on commit; this loop waits for that signal
    (or ``outbox_poll_interval`` at most) and then relays, and runs the rescuer every
    ``outbox_rescue_interval``. When the listening connection fails it reconnects with
    backoff; meanwhile beat's polling relay keeps commands flowing.
    """

    def __init__(self, outbox: Outbox, stop: threading.Event | None = None) -> None:
        self.outbox = outbox
        self.settings = outbox.settings
        self.stop = stop or threading.Event()
        self.listening = threading.Event()
        #: relay passes completed since start (tests wait on it instead of sleeping).
        self.passes = 0
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Listen and relay until ``stop`` is set."""
        backoff = 0.2
        next_rescue = 0.0
        while not self.stop.is_set():
            try:
                with self.outbox.store.listen() as wait:
                    self.listening.set()
                    backoff = 0.2
                    while not self.stop.is_set():
                        self.outbox.relay_once()
                        if time.monotonic() >= next_rescue:
                            self.outbox.rescue_once()
                            next_rescue = time.monotonic() + self.settings.rescue_interval
                        self.passes += 1
                        wait(self.settings.poll_interval)
            except StoreUnavailable as exc:
                log.warning("listening relay: %s; reconnecting in %.1fs", exc, backoff)
            except Exception:
                log.exception("listening relay failed; restarting in %.1fs", backoff)
            self.listening.clear()
            self.stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def start(self) -> threading.Thread:
        """Run in a daemon thread; returns it."""
        self._thread = threading.Thread(target=self.run, name="orch-outbox-relay", daemon=True)
        self._thread.start()
        return self._thread

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop and wait for its thread."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
