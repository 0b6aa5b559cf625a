"""The scheduler: turns due cron schedules into commands, each tick exactly once.

``run_once()`` is what beat's ``orch_outbox.schedules`` task, ``orch-outbox schedules
tick`` and tests call. Several beats may run it: the store locks due schedules with
``SKIP LOCKED``, so each tick becomes one command.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from . import cron
from .errors import StoreUnavailable

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("orch_outbox.scheduler")


def next_fire(row: Any, now: dt.datetime) -> dt.datetime:
    """The first tick of a schedule row's cron after ``now``."""
    return cron.next_fire(row["cron"], row["timezone"], now)


class Scheduler:
    """Pushes the commands of due schedules."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def run_once(self) -> list[dict[str, Any]]:
        """One pass: what happened per due schedule (pushed or skipped), in due order."""
        try:
            done = [dict(r) for r in self.store.tick_schedules(next_fire)]
        except StoreUnavailable as exc:
            log.warning("scheduler: %s", exc)
            return []
        if done:
            log.info("scheduler: %d schedule(s) ticked", len(done))
        return done
