"""Batches, groups and chords: settling (the continuation exactly once), appending, canceling, statistics."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa

from .. import canvas
from ..errors import BatchClosed, BatchNotFound, StoreUnavailable
from ..schema import (
    UNFINISHED_STATUSES as UNFINISHED,
)
from ..states import AttemptOutcome, BatchStatus, Status
from .base import (
    Row,
    StoreBase,
    _seconds_between,
    log,
)


class BatchStatements(StoreBase):
    """Batches, groups and chords: settling (the continuation exactly once), appending, canceling, statistics."""

    def settle_batches(self, batch_ids: Iterable[uuid.UUID | None]) -> int:
        """Finish every given batch whose members are all final, exactly once, with its continuation.

        Runs after the member's own commit, one transaction per batch. The batch row is
        locked, then the members are counted: whichever member commits last finds all of
        them final, and the status gate (``open`` → ``finished``) lets one settler through.
        A failure here loses nothing: the rescuer's sweep (:meth:`settle_open_batches`)
        settles batches that were left open.
        """
        fired = 0
        for batch_id in sorted({b for b in batch_ids if b is not None}):
            try:
                with self._tx() as conn:
                    fired += self._settle(conn, batch_id)
            except StoreUnavailable as exc:
                log.warning("batch %s not settled now (%s); the rescuer will", batch_id, exc)
        return fired

    def _settle(self, conn: sa.Connection, batch_id: uuid.UUID) -> int:
        b, t = self.batches, self.table
        batch = conn.execute(
            sa.select(b).where(b.c.id == batch_id, b.c.status == BatchStatus.OPEN).with_for_update()
        ).first()
        if batch is None:
            return 0
        unfinished = conn.execute(
            sa.select(t.c.id).where(t.c.batch_id == batch_id, t.c.status.in_(UNFINISHED)).limit(1)
        ).first()
        if unfinished is not None:
            return 0
        now = self._tx_now(conn) or self.clock()
        conn.execute(sa.update(b).where(b.c.id == batch_id).values(status=BatchStatus.FINISHED, finished_at=now))
        if batch.continuation is None:
            return 1
        members = conn.execute(
            sa.select(t.c.id, t.c.name, t.c.status, t.c.output, t.c.error_type, t.c.error_message)
            .where(t.c.batch_id == batch_id)
            .order_by(t.c.id)
        ).all()
        broken = []
        if batch.kind == "chord":
            value: Any = [m.output for m in members]
            broken = [m for m in members if m.status != Status.COMPLETED]
        else:
            value = [canvas.outcome_of(m) for m in members]
        row = canvas.row_from_step(batch.continuation, value, batch.parent_id, batch.tenant)
        row["id"] = batch.continuation_id
        if broken:  # as in Celery, a chord whose header did not complete never calls its body
            row.update(
                status=Status.FAILED,
                outcome=AttemptOutcome.FAILURE,
                finished_at=now,
                chain=None,
                error_type="ChordError",
                error_message=f"{len(broken)} of {len(members)} member(s) of chord {batch_id} did not complete; "
                f"first: {broken[0].id} ({broken[0].status})",
            )
        self.insert(conn, [row], strict=False, now=now)
        return 1

    def settle_open_batches(self, limit: int = 100) -> int:
        """The sweep: settle open batches with no unfinished member (a settle that never ran, expired members)."""
        b, t = self.batches, self.table
        stmt = (
            sa.select(b.c.id)
            .where(
                b.c.status == BatchStatus.OPEN,
                ~sa.exists(sa.select(t.c.id).where(t.c.batch_id == b.c.id, t.c.status.in_(UNFINISHED))),
            )
            .order_by(b.c.created_at)
            .limit(limit)
        )
        with self._one() as conn:
            ids = [r[0] for r in conn.execute(stmt)]
        return self.settle_batches(ids)

    def append(self, conn: sa.Connection, batch_id: uuid.UUID, rows: Sequence[Row]) -> list[uuid.UUID]:
        """Add members to an open batch, in the caller's transaction.

        The batch row stays locked until the caller commits, so the batch cannot finish
        in between: its last member's settle waits and then counts the new members.
        """
        b = self.batches
        batch = conn.execute(
            sa.update(b)
            .where(b.c.id == batch_id, b.c.status == BatchStatus.OPEN)
            .values(status=BatchStatus.OPEN)
            .returning(b.c.tenant)
        ).first()
        if batch is None:
            status = conn.execute(sa.select(b.c.status).where(b.c.id == batch_id)).scalar_one_or_none()
            if status is None:
                raise BatchNotFound(f"no batch with id {batch_id}")
            raise BatchClosed(f"batch {batch_id} is {status}: no member can be added to it")
        return self.insert(conn, [{**r, "batch_id": batch_id, "tenant": batch.tenant} for r in rows])

    def cancel_batch(
        self, batch_id: uuid.UUID, children_for: Callable[[uuid.UUID, str, Any], Sequence[Row]]
    ) -> tuple[str, int, list[tuple[uuid.UUID, int]]]:
        """Cancel a batch: (its status before, members canceled now, running attempts asked to stop).

        Pending and dispatched members become ``canceled`` (with their on-cancel
        commands); running ones get a cancellation request. The batch becomes
        ``canceled`` and its continuation never runs.
        """
        b, t = self.batches, self.table
        with self._tx() as conn:
            batch = conn.execute(sa.select(b.c.status).where(b.c.id == batch_id).with_for_update()).first()
            if batch is None:
                raise BatchNotFound(f"no batch with id {batch_id}")
            if batch.status != BatchStatus.OPEN:
                return str(batch.status), 0, []
            now = self._tx_now(conn) or self.clock()
            canceled = conn.execute(
                sa.update(t)
                .where(t.c.batch_id == batch_id, t.c.status.in_((Status.PENDING, Status.DISPATCHED)))
                .values(status=Status.CANCELED, outcome=AttemptOutcome.CANCELED, finished_at=now, lease_expires_at=None)
                .returning(t.c.id, t.c.name, t.c.input)
            ).all()
            children: list[Row] = []
            for row in canceled:
                children.extend(children_for(row.id, row.name, row.input))
            self.insert(conn, children, strict=False, now=now)
            running = conn.execute(
                sa.update(t)
                .where(t.c.batch_id == batch_id, t.c.status == Status.RUNNING, t.c.cancel_requested_at.is_(None))
                .values(cancel_requested_at=now)
                .returning(t.c.id, t.c.attempt)
            ).all()
            conn.execute(sa.update(b).where(b.c.id == batch_id).values(status=BatchStatus.CANCELED, finished_at=now))
        return BatchStatus.OPEN, len(canceled), [(r.id, int(r.attempt)) for r in running]

    def batch_stats(self, batch_id: uuid.UUID) -> Row | None:
        """A batch row with its members' counts by status and their first start and last finish."""
        b, t = self.batches, self.table
        with self._one() as conn:
            batch = conn.execute(sa.select(b).where(b.c.id == batch_id)).first()
            if batch is None:
                return None
            counts = conn.execute(
                sa.select(t.c.status, sa.func.count()).where(t.c.batch_id == batch_id).group_by(t.c.status)
            ).all()
            times = conn.execute(
                sa.select(sa.func.min(t.c.started_at), sa.func.max(t.c.finished_at)).where(t.c.batch_id == batch_id)
            ).one()
        return {
            **batch._mapping,
            "counts": {str(s): int(n) for s, n in counts},
            "first_started_at": times[0],
            "last_finished_at": times[1],
        }

    def list_batches(
        self, tenant: str | None = None, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[Row]:
        """Batches, newest first."""
        b = self.batches
        stmt = sa.select(b).order_by(b.c.created_at.desc(), b.c.id.desc()).limit(limit).offset(offset)
        if tenant is not None:
            stmt = stmt.where(b.c.tenant == tenant)
        if status is not None:
            stmt = stmt.where(b.c.status == status)
        with self._one() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def tenant_stats(self, tenant: str) -> Row:
        """Counts of a tenant's commands by status and of its batches by status, and its mean run time."""
        b, t = self.batches, self.table
        run_seconds = _seconds_between(t.c.started_at, t.c.finished_at, self.engine.dialect.name)
        with self._one() as conn:
            commands = conn.execute(
                sa.select(t.c.status, sa.func.count()).where(t.c.tenant == tenant).group_by(t.c.status)
            ).all()
            batches = conn.execute(
                sa.select(b.c.status, sa.func.count()).where(b.c.tenant == tenant).group_by(b.c.status)
            ).all()
            mean = conn.execute(
                sa.select(sa.func.avg(run_seconds)).where(
                    t.c.tenant == tenant, t.c.status == Status.COMPLETED, t.c.started_at.is_not(None)
                )
            ).scalar_one()
        return {
            "tenant": tenant,
            "commands": {str(s): int(n) for s, n in commands},
            "batches": {str(s): int(n) for s, n in batches},
            "mean_run_seconds": None if mean is None else float(mean),
        }
