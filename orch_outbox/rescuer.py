"""The rescuer: settles dispatch and run leases that lapsed, and dispatched commands past their expiry.

Lapsed dispatch leases go back to pending (the message was lost: no retry consumed) once
there is evidence of the loss: while the broker still holds messages of the row's target,
the message is most likely waiting behind them, so its lease is renewed instead (a
message republished there would only queue up behind the first, and a slow target would
turn into a storm of redispatches); an empty queue, or a broker that cannot say, is the
evidence;
lapsed running leases (the worker died, hung, or was cut off: it stopped renewing) count
as a lost attempt and end through ``settle.py`` — retried while retries are left,
failed with their on-failure commands after. One row that cannot be settled never stops
the pass. ``run_once()`` is what beat's ``orch_outbox.rescue`` task and tests call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import StoreUnavailable
from .settle import Attempt
from .states import Kind
from .store import ErrorInfo, Lapsed
from .telemetry import OFF, Telemetry

if TYPE_CHECKING:
    from .results import Results
    from .settle import Settler
    from .store import Store

log = logging.getLogger("orch_outbox.relay")


class Rescuer:
    """Settles dispatch and run leases that lapsed, and dispatched commands past their expiry."""

    def __init__(
        self,
        store: Store,
        settler: Settler,
        results: Results,
        telemetry: Telemetry = OFF,
        queue_depth: Callable[[str], int | None] | None = None,
        dispatch_timeout: float = 60.0,
    ) -> None:
        """``queue_depth(target)``: messages the broker holds for that target (None: it cannot say)."""
        self.store = store
        self.queue_depth = queue_depth
        self.dispatch_timeout = dispatch_timeout
        self.telemetry = telemetry
        self.settler = settler
        self.results = results

    def run_once(self, limit: int = 500) -> int:
        """One pass over lapsed leases, expiries and batches left open; returns how many rows changed.

        Each lapsed attempt is settled on its own (``settle.py``): a hook that raises, or a
        row that cannot be settled, is logged and the pass goes on with the others.
        """
        try:
            keep = self._still_queued()
            changed = self.store.release_lapsed_dispatches(limit, keep)
            for command_id in self.store.expire_dispatched(limit):
                self.results.revoked(command_id, "", "expired")
                self.telemetry.count("expired")
                changed += 1
            changed += self.store.settle_open_batches()
            lapsed_rows = self.store.lapsed_runs(limit)
        except StoreUnavailable as exc:
            log.warning("rescuer: %s", exc)
            return 0
        for lapsed in lapsed_rows:
            try:
                changed += int(self._settle(lapsed))
            except StoreUnavailable as exc:
                log.warning("rescuer: %s", exc)
                break
            except Exception:
                log.exception("rescuer: could not settle command %s attempt %s; going on", lapsed.id, lapsed.attempt)
        if changed:
            self.telemetry.count("rescued", changed)
            log.info("rescuer: settled %d lapsed lease(s)", changed)
        return changed

    def _still_queued(self) -> list[str]:
        """Targets with lapsed dispatch leases whose queue still holds messages: their leases renewed."""
        if self.queue_depth is None:
            return []
        keep = [t for t in self.store.lapsed_dispatch_targets() if (self.queue_depth(t) or 0) > 0]
        if keep:
            renewed = self.store.renew_lapsed_dispatches(keep, self.dispatch_timeout)
            log.info("rescuer: %d dispatch lease(s) renewed: their queues still hold messages (%s)", renewed, keep)
        return keep

    def _settle(self, lapsed: Lapsed) -> bool:
        attempt = Attempt(lapsed.id, lapsed.name, lapsed.attempt, lapsed.input, lapsed.retries, lapsed.retries_left)
        if lapsed.cancel_requested:  # canceled while running, and its worker never reported back
            return self.settler.canceled(attempt, lapsed_only=True, report_result=True).status is not None
        error = ErrorInfo(
            "LeaseExpired",
            f"attempt {lapsed.attempt} stopped reporting: its worker died, hung, or was cut off from the database",
        )
        if lapsed.kind == Kind.JOB:  # a job whose worker stopped renewing: back to pending, no retry used
            return self.store.release(lapsed.id, lapsed.attempt, error, lapsed_only=True)
        ending = self.settler.failed(attempt, "lost", error, lapsed_only=True, report_result=True)
        return ending.status is not None
