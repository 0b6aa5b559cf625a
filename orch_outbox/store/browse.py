"""What the operator's page and ``show`` read: searches with totals, the overview's counts, the attempt history.

Every read is bounded: a page of rows, counts grouped over the partial indexes (unfinished
rows, final rows of the last hour), the history of one command.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..schema import FINAL_STATUSES, UNFINISHED_STATUSES, attempts_table
from ..states import Status
from .base import StoreBase

#: Orders a search can take: due time, priority, finish time, creation (newest first by default).
SORTS = ("created", "due", "priority", "finished")


@dataclass(frozen=True)
class Search:
    """The filters of a command search (every field optional)."""

    status: str | None = None
    name: str | None = None
    target: str | None = None
    tenant: str | None = None
    batch_id: uuid.UUID | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    error: str | None = None


class BrowseStatements(StoreBase):
    """Searches with totals, the overview's counts, the attempt history."""

    def _search_where(self, search: Search) -> list[sa.ColumnElement[bool]]:
        t = self.table
        where: list[sa.ColumnElement[bool]] = []
        for column, value in (
            (t.c.status, search.status),
            (t.c.name, search.name),
            (t.c.target, search.target),
            (t.c.tenant, search.tenant),
            (t.c.batch_id, search.batch_id),
        ):
            if value is not None:
                where.append(column == value)
        if search.created_after is not None:
            where.append(t.c.created_at >= search.created_after)
        if search.created_before is not None:
            where.append(t.c.created_at < search.created_before)
        if search.error:
            pattern = "%" + search.error.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append(
                sa.or_(t.c.error_message.ilike(pattern, escape="\\"), t.c.error_type.ilike(pattern, escape="\\"))
            )
        return where

    def search(self, search: Search, limit: int, offset: int = 0, sort: str = "created") -> tuple[list[Any], int]:
        """A page of the commands matching ``search``, in ``sort`` order, and how many match in all."""
        t = self.table
        order = {
            "created": (t.c.created_at.desc(), t.c.id.desc()),
            "due": (t.c.scheduled_at, t.c.id),
            "priority": (t.c.priority.desc(), t.c.scheduled_at, t.c.id),
            "finished": (t.c.finished_at.desc().nulls_last(), t.c.id.desc()),
        }[sort]
        where = self._search_where(search)
        stmt = sa.select(t).where(*where).order_by(*order).limit(limit).offset(offset)
        with self._one() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
            total = conn.execute(sa.select(sa.func.count()).select_from(t).where(*where)).scalar_one()
        return rows, int(total)

    def matching_ids(self, search: Search, limit: int) -> list[uuid.UUID]:
        """The ids of up to ``limit`` commands matching ``search`` (a bulk action's rows)."""
        t = self.table
        stmt = sa.select(t.c.id).where(*self._search_where(search)).order_by(t.c.created_at).limit(limit)
        with self._one() as conn:
            return list(conn.execute(stmt).scalars())

    def overview(self) -> dict[str, Any]:
        """Unfinished commands by target and status, due now apart from later; final ones of the last hour."""
        t = self.table
        now = self._now()
        due = sa.func.count().filter(t.c.scheduled_at <= now)
        unfinished = (
            sa.select(t.c.target, t.c.status, sa.func.count(), due)
            .where(t.c.status.in_(UNFINISHED_STATUSES))
            .group_by(t.c.target, t.c.status)
        )
        hour = (
            sa.select(t.c.status, sa.func.count())
            .where(t.c.status.in_(FINAL_STATUSES), t.c.finished_at >= self._later(-3600))
            .group_by(t.c.status)
        )
        with self._one() as conn:
            rows = [(r[0], r[1], int(r[2]), int(r[3])) for r in conn.execute(unfinished)]
            finished = {r[0]: int(r[1]) for r in conn.execute(hour)}
        return {"unfinished": rows, "last_hour": finished}

    def attempt_history(self, command_id: uuid.UUID) -> list[dict[str, Any]]:
        """The attempts of one command that ended without a success, oldest first."""
        a = attempts_table(self.prefix)
        stmt = sa.select(a).where(a.c.command_id == command_id).order_by(a.c.attempt)
        with self._one() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def run_now(self, ids: list[uuid.UUID]) -> int:
        """Pending commands among ``ids`` become due now (a scheduled or backing-off command runs at once)."""
        if not ids:
            return 0
        t = self.table
        stmt = (
            sa.update(t)
            .where(t.c.id.in_(ids), t.c.status == Status.PENDING, t.c.scheduled_at > self._now())
            .values(scheduled_at=self._now())
        )
        with self._one() as conn:
            return int(conn.execute(stmt).rowcount)
