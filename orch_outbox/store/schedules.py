"""Cron schedules: one command per tick, also with several beats."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..schema import (
    UNFINISHED_STATUSES as UNFINISHED,
)
from ..uuid7 import uuid7
from .base import (
    Row,
    StoreBase,
    _dialect_insert,
)


class ScheduleStatements(StoreBase):
    """Cron schedules: one command per tick, also with several beats."""

    def put_schedule(self, values: Row) -> None:
        """Create or replace a schedule by name (its run history is kept)."""
        s = self.schedules
        with self._tx() as conn:
            now = self._tx_now(conn) or self.clock()
            row = {**values, "created_at": now, "updated_at": now}
            keep = {"created_at", "last_run_at", "last_command_id", "skipped", "name"}
            stmt = _dialect_insert(conn)(s).values(**row)
            stmt = stmt.on_conflict_do_update(
                index_elements=[s.c.name], set_={k: stmt.excluded[k] for k in row if k not in keep}
            )
            conn.execute(stmt)

    def get_schedule(self, name: str) -> Row | None:
        """One schedule by name."""
        s = self.schedules
        with self._one() as conn:
            row = conn.execute(sa.select(s).where(s.c.name == name)).first()
        return dict(row._mapping) if row else None

    def list_schedules(self) -> list[Row]:
        """All schedules, by name."""
        s = self.schedules
        with self._one() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(s).order_by(s.c.name))]

    def delete_schedule(self, name: str) -> bool:
        """Delete a schedule; False if there was none (commands it made are kept)."""
        s = self.schedules
        with self._tx() as conn:
            return bool(conn.execute(sa.delete(s).where(s.c.name == name)).rowcount == 1)

    def set_schedule(self, name: str, **values: Any) -> bool:
        """Change columns of one schedule (``enabled``, ``next_run_at``); False if there is none."""
        s = self.schedules
        with self._tx() as conn:
            now = self._tx_now(conn) or self.clock()
            return bool(conn.execute(sa.update(s).where(s.c.name == name).values(updated_at=now, **values)).rowcount)

    def tick_schedules(self, next_fire: Callable[[Row, datetime], datetime], limit: int = 100) -> list[Row]:
        """Turn due schedules into commands, each tick exactly once; returns what happened per schedule.

        One transaction: due schedules are locked (``FOR UPDATE SKIP LOCKED``, so a
        second beat skips them), their commands inserted and their next run moved past
        now, together. Catch-up after downtime: one command for all the missed ticks,
        then the schedule continues from the next tick after now. A ``unique`` schedule
        whose previous command is not final skips the tick (counted in ``skipped``).
        """
        s, t = self.schedules, self.table
        done: list[Row] = []
        with self._tx() as conn:
            now = self._tx_now(conn) or self.clock()
            due = conn.execute(
                sa.select(s)
                .where(s.c.enabled.is_(True), s.c.next_run_at <= now)
                .order_by(s.c.next_run_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            for sched in due:
                following = next_fire(dict(sched._mapping), now)
                busy = None
                if sched.is_unique and sched.last_command_id is not None:
                    busy = conn.execute(
                        sa.select(t.c.status).where(t.c.id == sched.last_command_id, t.c.status.in_(UNFINISHED))
                    ).scalar_one_or_none()
                if busy is not None:
                    conn.execute(
                        sa.update(s)
                        .where(s.c.name == sched.name)
                        .values(next_run_at=following, skipped=s.c.skipped + 1)
                    )
                    done.append({"name": sched.name, "command_id": None, "skipped": busy, "next_run_at": following})
                    continue
                row = {
                    "id": uuid7(),
                    "name": sched.command,
                    "target": sched.target,
                    "input": sched.input,
                    "retries": sched.retries,
                    "retries_left": sched.retries,
                    "timeout": sched.timeout,
                    "priority": sched.priority,
                    "tenant": sched.tenant,
                }
                (command_id,) = self.insert(conn, [row], strict=False, now=now)
                conn.execute(
                    sa.update(s)
                    .where(s.c.name == sched.name)
                    .values(next_run_at=following, last_run_at=now, last_command_id=command_id)
                )
                done.append({"name": sched.name, "command_id": command_id, "skipped": None, "next_run_at": following})
        return done
