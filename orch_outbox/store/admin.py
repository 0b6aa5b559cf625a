"""Operators' statements: pause and resume, dead letters (find, requeue, purge), retention, reads and counts."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..errors import OutboxError, UniqueConflict
from ..schema import (
    FINAL_STATUSES,
    UNFINISHED_STATUSES,
    notify_channel,
    unique_scope,
)
from ..states import BatchStatus, Status
from .base import (
    _NO_ERROR,
    Row,
    StoreBase,
    _dialect_insert,
)


class AdminStatements(StoreBase):
    """Operators' statements: pause and resume, dead letters (find, requeue, purge), retention, reads and counts."""

    def pause(self, scope: str, value: str) -> bool:
        """Hold back commands of a scope (``all``, ``target``, ``tenant``); False if it already was."""
        p = self.pauses
        with self._tx() as conn:
            now = self._tx_now(conn) or self.clock()
            stmt = _dialect_insert(conn)(p).values(scope=scope, value=value, paused_at=now).on_conflict_do_nothing()
            return conn.execute(stmt.returning(p.c.scope)).first() is not None

    def resume(self, scope: str, value: str) -> bool:
        """Lift a pause; False if there was none. Wakes listening relays on PostgreSQL."""
        p = self.pauses
        with self._tx() as conn:
            removed = conn.execute(sa.delete(p).where(p.c.scope == scope, p.c.value == value)).rowcount == 1
            if removed and self.can_listen:
                conn.execute(sa.select(sa.func.pg_notify(notify_channel(self.prefix), "")))
        return bool(removed)

    def paused(self) -> list[Row]:
        """The pauses in force."""
        p = self.pauses
        with self._one() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(p).order_by(p.c.scope, p.c.value))]

    def _filters(
        self,
        status: str | Sequence[str] | None = None,
        name: str | None = None,
        target: str | None = None,
        tenant: str | None = None,
        batch_id: uuid.UUID | None = None,
        ids: Sequence[uuid.UUID] | None = None,
    ) -> list[sa.ColumnElement[bool]]:
        t = self.table
        where: list[sa.ColumnElement[bool]] = []
        if status is not None:
            where.append(t.c.status == status if isinstance(status, str) else t.c.status.in_(list(status)))
        for column, value in ((t.c.name, name), (t.c.target, target), (t.c.tenant, tenant), (t.c.batch_id, batch_id)):
            if value is not None:
                where.append(column == value)
        if ids is not None:
            where.append(t.c.id.in_(list(ids)))
        return where

    def find(self, limit: int = 50, offset: int = 0, **filters: Any) -> list[Row]:
        """Commands matching the filters (status, name, target, tenant, batch_id, ids), newest first."""
        t = self.table
        stmt = (
            sa.select(t)
            .where(*self._filters(**filters))
            .order_by(t.c.created_at.desc(), t.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self._one() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def count(self, **filters: Any) -> int:
        """How many commands match the filters (as :meth:`find`)."""
        t = self.table
        with self._one() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(t).where(*self._filters(**filters))).scalar_one()
            )

    def requeue(self, **filters: Any) -> int:
        """Failed commands matching the filters back to pending, due now, with fresh retries.

        A failed command whose unique key another unfinished command holds stays failed.
        """
        t = self.table
        other = t.alias("holder")
        key_free = sa.or_(
            t.c.unique_key.is_(None),
            ~sa.exists(sa.select(other.c.id).where(other.c.unique_key == t.c.unique_key, unique_scope(other))),
        )
        stmt = (
            sa.update(t)
            .where(t.c.status == Status.FAILED, key_free, *self._filters(**filters))
            .values(
                status=Status.PENDING,
                retries_left=t.c.retries,
                scheduled_at=self._now(),
                outcome=None,
                finished_at=None,
                lease_expires_at=None,
                cancel_requested_at=None,
                worker=None,
                **_NO_ERROR,
            )
        )
        try:
            with self._tx() as conn:
                return int(conn.execute(stmt).rowcount)
        except sa.exc.IntegrityError as exc:
            raise UniqueConflict(
                "two failed commands to re-queue share a unique key; re-queue them one by one"
            ) from exc

    def purge(self, **filters: Any) -> int:
        """Delete final commands matching the filters (status defaults to ``failed``); members of open batches stay."""
        t = self.table
        status = filters.pop("status", None) or Status.FAILED
        statuses = [status] if isinstance(status, str) else list(status)
        if not set(statuses) <= set(FINAL_STATUSES):
            raise OutboxError(f"only final commands can be purged, not {sorted(set(statuses) - set(FINAL_STATUSES))}")
        with self._tx() as conn:
            stmt = sa.delete(t).where(*self._filters(status=statuses, **filters), self._not_in_open_batch())
            return int(conn.execute(stmt).rowcount)

    def _not_in_open_batch(self) -> sa.ColumnElement[bool]:
        """Rows a deletion may take: not members of a batch still open (its continuation will read them)."""
        t, b = self.table, self.batches
        return sa.or_(
            t.c.batch_id.is_(None),
            ~sa.exists(sa.select(b.c.id).where(b.c.id == t.c.batch_id, b.c.status == BatchStatus.OPEN)),
        )

    def delete_finished(self, statuses: Sequence[str], older_than: float, limit: int) -> int:
        """Delete up to ``limit`` rows in ``statuses`` finished more than ``older_than`` seconds ago.

        One short statement per call (rows locked by others are skipped), so clean-up
        never holds long locks; members of a still-open batch are kept for its continuation.
        """
        t, b = self.table, self.batches
        cutoff = self._later(-older_than)
        doomed = (
            sa.select(t.c.id)
            .where(
                t.c.status.in_(list(statuses)),
                t.c.finished_at < cutoff,
                self._not_in_open_batch(),
            )
            .limit(limit)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        with self._one() as conn:
            deleted = int(conn.execute(sa.delete(t).where(t.c.id.in_(doomed))).rowcount)
            old_batches = (
                sa.select(b.c.id)
                .where(
                    b.c.status != BatchStatus.OPEN,
                    b.c.finished_at < cutoff,
                    ~sa.exists(sa.select(t.c.id).where(t.c.batch_id == b.c.id)),
                )
                .limit(limit)
                .scalar_subquery()
            )
            deleted += int(conn.execute(sa.delete(b).where(b.c.id.in_(old_batches))).rowcount)
        return deleted

    def get(self, command_id: uuid.UUID) -> Row | None:
        """One command row by id."""
        with self._one() as conn:
            row = conn.execute(sa.select(self.table).where(self.table.c.id == command_id)).first()
        return dict(row._mapping) if row else None

    def children(self, parent_id: uuid.UUID) -> list[Row]:
        """The commands chained from one parent, oldest first."""
        t = self.table
        with self._one() as conn:
            rows = conn.execute(sa.select(t).where(t.c.parent_id == parent_id).order_by(t.c.created_at)).all()
        return [dict(r._mapping) for r in rows]

    def counts(self) -> list[tuple[str, str, int]]:
        """(target, status, count) over the whole table."""
        t = self.table
        stmt = (
            sa.select(t.c.target, t.c.status, sa.func.count())
            .group_by(t.c.target, t.c.status)
            .order_by(t.c.target, t.c.status)
        )
        with self._one() as conn:
            return [(r[0], r[1], int(r[2])) for r in conn.execute(stmt)]

    def backlog(self) -> list[tuple[str, str, int, datetime | None]]:
        """(target, status, count, oldest due time) of the unfinished commands (the unfinished index serves it)."""
        t = self.table
        stmt = (
            sa.select(t.c.target, t.c.status, sa.func.count(), sa.func.min(t.c.scheduled_at))
            .where(t.c.status.in_(UNFINISHED_STATUSES))
            .group_by(t.c.target, t.c.status)
        )
        with self._one() as conn:
            return [(r[0], r[1], int(r[2]), r[3]) for r in conn.execute(stmt)]

    def dead_letters(self) -> list[tuple[str, int]]:
        """(target, count) of the failed commands."""
        t = self.table
        stmt = sa.select(t.c.target, sa.func.count()).where(t.c.status == Status.FAILED).group_by(t.c.target)
        with self._one() as conn:
            return [(r[0], int(r[1])) for r in conn.execute(stmt)]

    def unfinished(self) -> int:
        """How many commands are not in a final state, plus the batches still open.

        An open batch counts because its continuation is still to come: between its last
        member's commit and the settle, no command is unfinished, yet work remains.
        """
        t, b = self.table, self.batches
        commands = sa.select(sa.func.count()).where(t.c.status.not_in(FINAL_STATUSES)).scalar_subquery()
        batches = sa.select(sa.func.count()).where(b.c.status == BatchStatus.OPEN).scalar_subquery()
        with self._one() as conn:
            return int(conn.execute(sa.select(commands + batches)).scalar_one())
