"""An attempt's start on the worker (dispatched → running), alone or grouped, and the ways it does not start."""

from __future__ import annotations

import dataclasses
import functools
import json
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from ..states import AttemptOutcome, Status
from .base import BY_KEY_ONLY, Started, StoreBase
from .grouped import Grouped
from .hotpath import Prepared, prepared

#: The connection every start of a process goes on: the grouped starts send one call at a time, so one connection
#: serves all the handler threads (a threads pool holds one session for its starts, not one per thread).
START_LANE = "start"
#: A start asked for: (command id, attempt, name, worker, lease).
StartWanted = tuple[uuid.UUID, int, str, str, timedelta]
#: Fewest starts of one group sent as one statement (fewer go as one statement each, in one pipeline).
START_MANY_MIN = 4


class StartStatements(StoreBase):
    """An attempt's start: claimed for a worker, or expired or held back by a pause before it started."""

    def start(self, command_id: uuid.UUID, attempt: int, name: str, worker: str, lease: float) -> Started | None:
        """Claim one attempt for a worker (dispatched → running); None if it is not this attempt's to run."""
        if self._hot is not None:
            return self._grouped_starts((command_id, attempt, name, worker, timedelta(seconds=lease)))
        params = {"p_id": command_id, "p_attempt": attempt, "p_name": name, "p_worker": worker}
        with self._one(relaxed=True) as conn:
            row = conn.execute(self._start_stmt, {**params, **self._p_times(p_lease=lease)}).first()
        return Started(**row._mapping) if row else None

    @functools.cached_property
    def _hot_start(self) -> Prepared:
        return prepared(self.engine, self._start_stmt, f"{self.prefix}start", {"p_lease": timedelta})

    @functools.cached_property
    def _grouped_starts(self) -> Grouped[StartWanted, Started | None]:
        """Starts of this process's handler threads: one alone goes at once; those that queue up while one is in
        flight go next, in one round trip (see grouped.py)."""
        return Grouped(self._start_one, self._start_many)

    def _start_values(self, wanted: StartWanted) -> list[bytes | None]:
        command_id, attempt, name, worker, lease = wanted
        given = {"p_id": command_id, "p_attempt": attempt, "p_name": name, "p_worker": worker, "p_lease": lease}
        return self._hot_start.values(given)

    def _start_one(self, wanted: StartWanted) -> Started | None:
        assert self._hot is not None
        rows = self._hot.run(self._relaxed is not None, self._hot_start, self._start_values(wanted), START_LANE)
        return Started(*rows[0]) if rows else None

    def _start_many(self, wanted: Sequence[StartWanted]) -> list[Started | None]:
        """Several starts in one round trip and one transaction: from ``START_MANY_MIN`` in one statement (see
        :meth:`_start_many_stmt`), fewer as the single start's statement once per attempt, pipelined (cheaper for
        PostgreSQL than the set-up and the join of the one statement, measured on Redis's mostly small groups)."""
        assert self._hot is not None
        if len(wanted) >= START_MANY_MIN:
            return self._start_in_one(wanted)
        order = sorted(range(len(wanted)), key=lambda i: wanted[i][0])  # rows locked in one order by every process
        each = [self._start_values(wanted[i]) for i in order]
        firsts = self._hot.run_each(self._relaxed is not None, self._hot_start, each, START_LANE)
        answers: list[Started | None] = [None] * len(wanted)
        for i, one in zip(order, firsts, strict=True):
            answers[i] = None if one is None else Started(*one)
        return answers

    def _start_in_one(self, wanted: Sequence[StartWanted]) -> list[Started | None]:
        """A group of starts as one statement; an attempt asked for twice in it (the same message delivered twice)
        is sent once, for its first caller."""
        assert self._hot is not None
        first = {(w[0], w[1]): i for i, w in reversed(list(enumerate(wanted)))}  # each attempt's first caller
        sent = [wanted[i] for i in first.values()]
        document = [
            {
                "id": str(cid),
                "attempt": attempt,
                "name": name,
                "worker": worker,
                "lease": f"{lease.total_seconds()!r} s",
            }
            for cid, attempt, name, worker, lease in sent
        ]
        statement = self._hot_start_many
        values = statement.values({"p_ids": [w[0] for w in sent], "p_wanted": json.dumps(document)})
        found = self._hot.run_after(self._relaxed is not None, BY_KEY_ONLY.encode(), statement, values, START_LANE)
        started = {(row[0], row[3]): Started(*row) for row in found}
        return [started.get((w[0], w[1])) if first[w[0], w[1]] == i else None for i, w in enumerate(wanted)]

    @functools.cached_property
    def _hot_start_many(self) -> Prepared:
        return prepared(self.engine, self._start_many_stmt, f"{self.prefix}start_many")

    @functools.cached_property
    def _start_many_stmt(self) -> sa.Update:
        """Starts of many attempts in ONE statement (PostgreSQL): ``p_ids``, their ids (an array), and ``p_wanted``,
        a JSON array of ``{id, attempt, name, worker, lease}``; each row fenced as in :meth:`start`. Run after
        :data:`BY_KEY_ONLY`, as the batches of successes are, for the same reasons."""
        t = self.table
        wanted, fence = self._p_fence_many(
            Status.DISPATCHED,
            "wanted",
            sa.column("name", t.c.name.type),
            sa.column("worker", t.c.worker.type),
            sa.column("lease", sa.Interval()),
        )
        return (
            sa.update(t)
            .where(*fence, t.c.name == wanted.c.name, *self._startable())
            .values(
                status=Status.RUNNING,
                started_at=self._p_now(),
                lease_expires_at=self._p_now() + wanted.c.lease,
                worker=wanted.c.worker,
            )
            .returning(*self._started_columns())
        )

    @functools.cached_property
    def _start_stmt(self) -> sa.Update:
        t = self.table
        return (
            sa.update(t)
            .where(
                *self._p_fence(Status.DISPATCHED),
                t.c.name == sa.bindparam("p_name", type_=t.c.name.type),
                *self._startable(),
            )
            .values(
                status=Status.RUNNING,
                started_at=self._p_now(),
                lease_expires_at=self._p_later("p_lease"),
                worker=sa.bindparam("p_worker", type_=t.c.worker.type),
            )
            .returning(*self._started_columns())
        )

    def _startable(self) -> list[sa.ColumnElement[bool]]:
        """What a start, alone or grouped, asks of its row beyond the fence: its target not paused, not expired."""
        t = self.table
        return [~self._paused(), sa.or_(t.c.expires_at.is_(None), t.c.expires_at > self._p_now())]

    def _started_columns(self) -> list[sa.Column[Any]]:
        """What a start returns, in :class:`Started`'s order (its rows are read into one positionally)."""
        return [self.table.c[f.name] for f in dataclasses.fields(Started)]

    def expire(self, command_id: uuid.UUID, attempt: int) -> bool:
        """A dispatched attempt whose command expired before it started: ``expired``, nothing run or chained."""
        t = self.table
        stmt = (
            sa.update(t)
            .where(
                t.c.id == command_id,
                t.c.status == Status.DISPATCHED,
                t.c.attempt == attempt,
                t.c.expires_at.is_not(None),
                t.c.expires_at <= self._now(),
            )
            .values(
                status=Status.EXPIRED, outcome=AttemptOutcome.EXPIRED, finished_at=self._now(), lease_expires_at=None
            )
            .returning(t.c.batch_id)
        )
        with self._one() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return False
        self.settle_batches([row.batch_id])
        return True

    def hold_back(self, command_id: uuid.UUID, attempt: int) -> bool:
        """A dispatched attempt whose command was paused before it started: back to pending, no retry used."""
        t = self.table
        stmt = (
            sa.update(t)
            .where(t.c.id == command_id, t.c.status == Status.DISPATCHED, t.c.attempt == attempt, self._paused())
            .values(status=Status.PENDING, lease_expires_at=None)
        )
        with self._one() as conn:
            return bool(conn.execute(stmt).rowcount == 1)
