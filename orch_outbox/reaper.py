"""The reaper: a worker whose registry row stopped renewing is dead, and what it ran returns to pending at once.

Run by the rescuer's pass (beat, the listening relay, ``orch-outbox relay``). For each
worker not seen for ``outbox_worker_timeout``, every attempt it was running ends now,
without waiting for the attempt's own lease: a command as a lost attempt (``settle.py``:
retried while retries are left), a job handed back to pending without using a retry, a
canceled one as canceled. Then the worker's row is removed. Each write is fenced by the
attempt, so several reapers (several beats) never settle one attempt twice, and a worker
that was only cut off finds its attempts gone when it comes back.

The reaper judges only what it watched: after its own pass failed or paused for longer
than half the worker timeout (a database outage cuts every worker off at once), it waits
a full worker timeout before it declares anyone dead, so live workers renew first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import StoreUnavailable
from .settle import Attempt
from .states import Kind
from .store import ErrorInfo, Lapsed
from .telemetry import OFF, Telemetry

if TYPE_CHECKING:
    from .settings import Settings
    from .settle import Settler
    from .store import Store

log = logging.getLogger("orch_outbox.reaper")


class Reaper:
    """Returns what dead workers held (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        settler: Settler,
        settings: Settings,
        monotonic: Callable[[], float] = time.monotonic,
        telemetry: Telemetry = OFF,
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self.settler = settler
        self.settings = settings
        self._monotonic = monotonic
        #: monotonic time of the last pass that reached the database, and since when passes have been regular
        self._last_pass: float | None = None
        self._watching_since: float | None = None

    def run_once(self) -> int:
        """One pass; returns how many attempts were returned."""
        now = self._monotonic()
        timeout = self.settings.worker_timeout
        gap_limit = max(timeout / 2, 2.5 * self.settings.rescue_interval)
        if self._last_pass is None or now - self._last_pass > gap_limit:
            self._watching_since = now  # first pass, or after a pause: watch a full timeout first
        try:
            dead = self.store.stale_workers(timeout) if now - (self._watching_since or now) >= timeout else []
        except StoreUnavailable as exc:
            log.warning("reaper: %s", exc)
            self._last_pass = None
            return 0
        self._last_pass = now
        returned = 0
        for worker, incarnation in dead:
            try:
                returned += self._reap(worker, incarnation)
            except StoreUnavailable as exc:
                log.warning("reaper: %s", exc)
                break
        return returned

    def returned_by_restart(self, previous: dict[str, Any], started_at: Any) -> int:
        """A worker restarted under its nodename: what its earlier incarnation still ran returns now."""
        held = self.store.held_by(previous["name"], started_before=started_at)
        settled = self._settle_all(previous["name"], held)
        if held:
            log.warning(
                "reaper: %s restarted; returned %d of the %d attempt(s) its earlier run left",
                previous["name"],
                settled,
                len(held),
            )
        return settled

    def _reap(self, worker: str, incarnation: str) -> int:
        held = self.store.held_by(worker)
        settled = self._settle_all(worker, held)
        if not self.store.held_by(worker, limit=1):
            self.store.forget_worker(worker, incarnation)
        log.warning(
            "reaper: worker %s stopped renewing for %ss; returned %d of the %d attempt(s) it ran",
            worker,
            self.settings.worker_timeout,
            settled,
            len(held),
        )
        return settled

    def _settle_all(self, worker: str, held: list[Lapsed]) -> int:
        settled = self._settle_each(worker, held)
        self.telemetry.count("reallocated", settled)
        return settled

    def _settle_each(self, worker: str, held: list[Lapsed]) -> int:
        settled = 0
        for lapsed in held:
            try:
                settled += int(self._settle(worker, lapsed))
            except StoreUnavailable:
                raise
            except Exception:
                log.exception("reaper: could not return command %s attempt %s; going on", lapsed.id, lapsed.attempt)
        return settled

    def _settle(self, worker: str, lapsed: Lapsed) -> bool:
        attempt = Attempt(lapsed.id, lapsed.name, lapsed.attempt, lapsed.input, lapsed.retries, lapsed.retries_left)
        if lapsed.cancel_requested:
            return self.settler.canceled(attempt, report_result=True).status is not None
        error = ErrorInfo(
            "WorkerLost", f"attempt {lapsed.attempt} ran on {worker}, which stopped renewing its registry row"
        )
        if lapsed.kind == Kind.JOB:
            return self.store.release(lapsed.id, lapsed.attempt, error)
        return self.settler.failed(attempt, "lost", error, report_result=True).status is not None
