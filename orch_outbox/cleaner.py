"""The cleaner: deletes final rows past their retention, in short batches within a time budget.

``run_once()`` is what beat's ``orch_outbox.cleanup`` task, ``orch-outbox cleanup`` and
tests call. Completed, canceled and expired rows are kept ``outbox_retention`` seconds,
failed ones (dead letters) ``outbox_failed_retention``; zero keeps them for ever.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .errors import StoreUnavailable
from .states import Status

if TYPE_CHECKING:
    from .settings import Settings
    from .store import Store

log = logging.getLogger("orch_outbox.cleaner")

#: Longest one cleanup pass keeps deleting before it yields to the next tick.
RUN_BUDGET_SECONDS = 5.0


class Cleaner:
    """Deletes final rows past their retention."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def run_once(self, budget: float = RUN_BUDGET_SECONDS) -> int:
        """Delete for at most ``budget`` seconds; returns how many rows were deleted."""
        settings = self.settings
        deadline = time.monotonic() + budget
        deleted = 0
        plans = [
            ((Status.COMPLETED, Status.CANCELED, Status.EXPIRED), settings.retention),
            ((Status.FAILED,), settings.failed_retention),
        ]
        try:
            for statuses, keep in plans:
                if keep <= 0:
                    continue
                while time.monotonic() < deadline:
                    n = self.store.delete_finished(statuses, keep, settings.cleanup_batch)
                    deleted += n
                    if n < settings.cleanup_batch:
                        break
        except StoreUnavailable as exc:
            log.warning("cleaner: %s", exc)
        if deleted:
            log.info("cleanup: deleted %d row(s) past their retention", deleted)
        return deleted
