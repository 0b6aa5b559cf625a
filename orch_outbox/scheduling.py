"""Cron schedules: create, read, switch and tick them."""

from __future__ import annotations

import logging
from typing import Any

from celery.canvas import Signature, _chain, _chord, group

from .errors import (
    InvalidInput,
    InvalidOption,
    ScheduleNotFound,
)
from .models import ScheduleInfo
from .parts import OutboxParts
from .validation import (
    _schedule_name,
    _tenant,
)

log = logging.getLogger("orch_outbox")


class Scheduling(OutboxParts):
    """Cron schedules: create, read, switch and tick them."""

    def put_schedule(
        self,
        name: str,
        call: Signature,
        cron: str,
        *,
        timezone: str = "UTC",
        enabled: bool = True,
        unique: bool = False,
        tenant: str | None = None,
    ) -> ScheduleInfo:
        """Create or replace the schedule ``name``: ``call`` is pushed at every tick of ``cron``.

        ``cron`` has five fields (minute hour day-of-month month day-of-week) with
        Celery's ``crontab`` semantics, read in ``timezone``. ``unique``: a tick is
        skipped while the command of the previous tick is not final. Each tick becomes
        one command even with several beats; after downtime, the missed ticks become one
        command and the schedule goes on from the next tick.
        """
        from . import cron as cron_mod

        name = _schedule_name(name)
        cron_mod.parse(cron)
        cron_mod.zone(timezone)
        if isinstance(call, (_chain, _chord, group)):
            raise InvalidInput("a schedule pushes a single task signature")
        row = self.row_for(call)
        for key in ("scheduled_at", "expires_at", "unique_key", "delay"):
            if row.get(key) is not None or row.get("expires") is not None:
                raise InvalidOption(f"a scheduled signature cannot carry {key}: each tick is due when it fires")
        now = self.store.now()
        self.store.put_schedule(
            {
                "name": name,
                "command": row["name"],
                "input": row["input"],
                "cron": cron,
                "timezone": timezone,
                "target": row["target"],
                "tenant": _tenant(tenant) if tenant is not None else row.get("tenant"),
                "priority": row["priority"],
                "retries": row["retries"],
                "timeout": row["timeout"],
                "enabled": bool(enabled),
                "is_unique": bool(unique),
                "next_run_at": cron_mod.next_fire(cron, timezone, now),
            }
        )
        return self.schedule(name)

    def schedule(self, name: str) -> ScheduleInfo:
        """One schedule; raises :class:`ScheduleNotFound`."""
        row = self.store.get_schedule(name)
        if row is None:
            raise ScheduleNotFound(f"no schedule named {name!r}")
        return ScheduleInfo.from_row(row)

    def schedules(self) -> list[ScheduleInfo]:
        """Every schedule, by name."""
        return [ScheduleInfo.from_row(r) for r in self.store.list_schedules()]

    def delete_schedule(self, name: str) -> bool:
        """Delete a schedule; False if there was none. Commands it already pushed are kept."""
        return self.store.delete_schedule(name)

    def enable_schedule(self, name: str, enabled: bool = True) -> ScheduleInfo:
        """Switch a schedule on or off; switching on counts from now (no catch-up of the time it was off)."""
        from . import cron as cron_mod

        current = self.schedule(name)
        values: dict[str, Any] = {"enabled": bool(enabled)}
        if enabled and not current.enabled:
            values["next_run_at"] = cron_mod.next_fire(current.cron, current.timezone, self.store.now())
        self.store.set_schedule(name, **values)
        return self.schedule(name)
