"""The worker registry and the jobs: register, renew, forget a worker; claim, release and list jobs.

A worker renews its row every ``outbox_worker_heartbeat`` seconds with one statement
(never one per command); the reaper reads the rows that stopped renewing and what they
held. Jobs are rows of the commands table with ``kind = 'job'``: the worker that runs one
claims it (pending → running, no broker in between), within its capacity.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..states import AttemptOutcome, Kind, Status
from .base import ErrorInfo, Lapsed, Row, Started, StoreBase, _error_values


class WorkerStatements(StoreBase):
    """The worker registry and the jobs' own statements."""

    # -- the registry ---------------------------------------------------------------------

    def register_worker(self, row: Row) -> dict[str, Any] | None:
        """Insert a worker's row (``last_seen_at`` now), replacing one of the same name; returns the row replaced.

        A replaced row of another incarnation is an earlier run of the same worker (a restart):
        what it still holds is returned by the caller.
        """
        w = self.workers
        with self._tx() as conn:
            previous = conn.execute(sa.select(w).where(w.c.name == row["name"]).with_for_update()).first()
            conn.execute(sa.delete(w).where(w.c.name == row["name"]))
            conn.execute(sa.insert(w).values(**row, last_seen_at=self._now()))
        return dict(previous._mapping) if previous is not None else None

    def renew_worker(self, name: str, incarnation: str) -> bool:
        """Say the worker is alive; False if its row is gone (judged dead and reaped) or another incarnation's."""
        w = self.workers
        stmt = sa.update(w).where(w.c.name == name, w.c.incarnation == incarnation).values(last_seen_at=self._now())
        with self._one(relaxed=True) as conn:
            return bool(conn.execute(stmt).rowcount)

    def forget_worker(self, name: str, incarnation: str | None = None) -> bool:
        """Remove a worker's row (warm shutdown, or once what it held was returned), of that incarnation if given."""
        w = self.workers
        stmt = sa.delete(w).where(w.c.name == name)
        if incarnation is not None:
            stmt = stmt.where(w.c.incarnation == incarnation)
        with self._one() as conn:
            return bool(conn.execute(stmt).rowcount)

    def stale_workers(self, older_than: float) -> list[tuple[str, str]]:
        """(name, incarnation) of the workers whose row was last renewed more than ``older_than`` seconds ago."""
        w = self.workers
        stmt = (
            sa.select(w.c.name, w.c.incarnation)
            .where(w.c.last_seen_at < self._later(-older_than))
            .order_by(w.c.last_seen_at)
        )
        with self._one() as conn:
            return [(r.name, r.incarnation) for r in conn.execute(stmt)]

    def held_by(self, worker: str, limit: int = 1000, started_before: datetime | None = None) -> list[Lapsed]:
        """The running attempts of the worker ``worker`` (read only; each is then settled by a fenced write).

        ``started_before``: only those started before then (an earlier incarnation's).
        """
        t = self.table
        stmt = (
            self._select_lapsed()
            .where(t.c.status == Status.RUNNING, t.c.worker == worker)
            .order_by(t.c.started_at)
            .limit(limit)
        )
        if started_before is not None:
            stmt = stmt.where(t.c.started_at < started_before)
        with self._one() as conn:
            return [Lapsed(**r._mapping) for r in conn.execute(stmt)]

    def list_workers(self, limit: int | None = None, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Registered workers by name, a page of them, and how many there are."""
        w = self.workers
        stmt = sa.select(w).order_by(w.c.name).offset(offset)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._one() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(w)).scalar_one()
            return [dict(r._mapping) for r in conn.execute(stmt)], int(total)

    def get_worker(self, name: str) -> dict[str, Any] | None:
        """One worker's row, by its nodename."""
        w = self.workers
        with self._one() as conn:
            row = conn.execute(sa.select(w).where(w.c.name == name)).first()
        return dict(row._mapping) if row else None

    def running_on(self, workers: Sequence[str]) -> list[dict[str, Any]]:
        """The running commands and jobs of these workers (id, name, kind, status, attempt, started, worker)."""
        if not workers:
            return []
        t = self.table
        stmt = (
            sa.select(t.c.id, t.c.name, t.c.kind, t.c.status, t.c.attempt, t.c.started_at, t.c.worker, t.c.unique_key)
            .where(t.c.status == Status.RUNNING, t.c.worker.in_(list(workers)))
            .order_by(t.c.worker, t.c.started_at)
        )
        with self._one() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    # -- jobs -----------------------------------------------------------------------------

    def claim_jobs(self, worker: str, targets: Sequence[str], limit: int, lease: float) -> list[Started]:
        """Claim up to ``limit`` due pending jobs of ``targets`` for ``worker`` (pending → running, a new attempt)."""
        if limit <= 0 or not targets:
            return []
        params = {"p_worker": worker, "p_targets": list(targets), "p_limit": limit, **self._p_times(p_lease=lease)}
        with self._tx() as conn:
            rows = conn.execute(self._claim_jobs_stmt, params).all()
        return sorted((Started(**r._mapping) for r in rows), key=lambda s: s.id)

    @functools.cached_property
    def _claim_jobs_stmt(self) -> sa.Update:
        """The claim of due jobs, built once (a worker's registry claims at every renewal): ``p_worker``,
        ``p_targets``, ``p_limit``, and the clock's ``p_now`` / ``p_lease``."""
        t = self.table
        locked = (
            sa.select(t.c.id)
            .where(
                t.c.status == Status.PENDING,
                t.c.kind == Kind.JOB,
                t.c.target.in_(sa.bindparam("p_targets", expanding=True, type_=t.c.target.type)),
                t.c.scheduled_at <= self._p_now(),
                ~self._paused(),
            )
            .order_by(t.c.priority.desc(), t.c.scheduled_at)
            .limit(sa.bindparam("p_limit", type_=sa.Integer()))
            .with_for_update(skip_locked=True)
            .cte("locked")  # a CTE runs once: an IN (subquery LIMIT n) may be rescanned and take more than n
        )
        return (
            sa.update(t)
            .where(
                t.c.id.in_(sa.select(locked.c.id)), t.c.status == Status.PENDING
            )  # the locked rows are pending: said here too
            .values(
                status=Status.RUNNING,
                attempt=t.c.attempt + 1,
                dispatched_at=self._p_now(),
                started_at=self._p_now(),
                lease_expires_at=self._p_later("p_lease"),
                worker=sa.bindparam("p_worker", type_=t.c.worker.type),
            )
            .returning(*(t.c[name] for name in _STARTED))
        )

    def release(
        self,
        command_id: uuid.UUID,
        attempt: int,
        error: ErrorInfo,
        worker: str | None = None,
        lapsed_only: bool = False,
    ) -> bool:
        """A running job that lost its worker goes back to pending, due now, no retry used; False if fenced out.

        ``worker``: only while that worker still holds it (a worker giving up its own jobs).
        ``lapsed_only``: the rescuer's form (the lease must have run out).
        """
        t = self.table
        fence = [*self._fence(command_id, attempt, lapsed_only)]
        if worker is not None:
            fence.append(t.c.worker == worker)
        stmt = (
            sa.update(t)
            .where(*fence)
            .values(
                status=Status.PENDING,
                outcome=AttemptOutcome.LOST,
                scheduled_at=self._now(),
                lease_expires_at=None,
                **_error_values(error),
            )
        )
        with self._one() as conn:
            return conn.execute(stmt).rowcount == 1

    def find_job(self, name: str) -> dict[str, Any] | None:
        """The newest job named ``name`` (its unique key), unfinished first."""
        t = self.table
        unfinished = sa.case((t.c.status.in_((Status.PENDING, Status.RUNNING)), 0), else_=1)
        stmt = (
            sa.select(t)
            .where(t.c.kind == Kind.JOB, t.c.unique_key == job_key(name))
            .order_by(unfinished, t.c.created_at.desc())
            .limit(1)
        )
        with self._one() as conn:
            row = conn.execute(stmt).first()
        return dict(row._mapping) if row else None

    def list_jobs(
        self, status: str | None = None, worker: str | None = None, limit: int | None = 100, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        """Jobs, newest first, filtered by status and worker; a page of them and how many match."""
        t = self.table
        where = [t.c.kind == Kind.JOB]
        if status is not None:
            where.append(t.c.status == status)
        if worker is not None:
            where.append(t.c.worker == worker)
        stmt = sa.select(t).where(*where).order_by(t.c.created_at.desc(), t.c.id).offset(offset)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._one() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(t).where(*where)).scalar_one()
            return [dict(r._mapping) for r in conn.execute(stmt)], int(total)


#: The columns a job claim returns, in Started's order.
_STARTED = tuple(f.name for f in dataclasses.fields(Started))


def job_key(name: str) -> str:
    """The unique key that keeps one unfinished job per name."""
    return f"job:{name}"
