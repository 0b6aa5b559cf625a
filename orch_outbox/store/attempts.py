"""An attempt's life on the worker once started: renew, heartbeat, and every fenced ending (complete, retry, fail,
cancel)."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from ..canvas import Plan
from ..schema import (
    UNFINISHED_STATUSES as UNFINISHED,
)
from ..states import AttemptOutcome, Status
from .base import (
    _NO_ERROR,
    BY_KEY_ONLY,
    ErrorInfo,
    Row,
    StoreBase,
    _error_values,
)
from .hotpath import Prepared, _HotPath, prepared

#: A success to record: (command id, attempt, output).
Completion = tuple[uuid.UUID, int, Any]


class AttemptStatements(StoreBase):
    """An attempt's life on the worker once started: renew, heartbeat, every fenced ending."""

    @functools.cached_property
    def _hot_complete_many(self) -> Prepared:
        return prepared(self.engine, self._complete_many_stmt, f"{self.prefix}complete_many")

    def renew(self, attempts: Sequence[tuple[uuid.UUID, int]], lease: float) -> dict[tuple[uuid.UUID, int], bool]:
        """Keep the leases of attempts still running in this process alive: at least now + ``lease``.

        Returns, for each attempt that still holds its command, whether its cancellation
        was requested; an attempt missing from the answer was fenced off (rescued,
        canceled, or its command finished otherwise) and must stop. Called by each worker
        process once a second for its attempts older than a second: no statement per command.
        """
        if not attempts:
            return {}
        t = self.table
        later = self._later(lease)
        stmt = (
            sa.update(t)
            .where(sa.tuple_(t.c.id, t.c.attempt).in_(list(attempts)), t.c.status == Status.RUNNING)
            .values(lease_expires_at=sa.case((t.c.lease_expires_at < later, later), else_=t.c.lease_expires_at))
            .returning(t.c.id, t.c.attempt, t.c.cancel_requested_at)
        )
        with self._one(relaxed=True) as conn:
            rows = conn.execute(stmt).all()
        return {(r.id, r.attempt): r.cancel_requested_at is not None for r in rows}

    def complete(self, command_id: uuid.UUID, attempt: int, output: Any, children: Sequence[Row] | Plan) -> bool:
        """Record success and insert the on-success commands, in one transaction; False if fenced out."""
        if children:
            values = {"status": Status.COMPLETED, "outcome": AttemptOutcome.SUCCESS, "output": output, **_NO_ERROR}
            return self._finish(command_id, attempt, values, children)
        if self._hot is not None:
            return command_id in self.complete_many([(command_id, attempt, output)])
        params = {"p_id": command_id, "p_attempt": attempt, "p_output": output, **self._p_times()}
        with self._one() as conn:
            row = conn.execute(self._complete_stmt, params).first()
        if row is None:
            return False
        self.settle_batches([row.batch_id])
        return True

    def complete_many(self, items: Sequence[tuple[uuid.UUID, int, Any]]) -> set[uuid.UUID]:
        """Record many successes without chained commands, in one statement and one commit.

        ``items``: (command id, attempt, output). Each row is fenced as in :meth:`complete`;
        returns the ids that were recorded (the others no longer belonged to their attempt).
        """
        if not items:
            return set()
        if self._hot is not None:
            return self._complete_soon(self._hot, items)()
        if self.engine.dialect.name != "postgresql":
            return {cid for cid, attempt, output in items if self.complete(cid, attempt, output, [])}
        ordered = sorted(items, key=lambda item: item[0])
        done = [{"id": str(cid), "attempt": attempt, "output": output} for cid, attempt, output in ordered]
        with self._tx() as conn:
            conn.exec_driver_sql(BY_KEY_ONLY)
            params = {"p_ids": [i[0] for i in ordered], "p_done": done, **self._p_times()}
            rows = conn.execute(self._complete_many_stmt, params).all()
        self.settle_batches(r.batch_id for r in rows)
        return {r.id for r in rows}

    def complete_many_soon(self, items: Sequence[Completion]) -> Callable[[], set[uuid.UUID]]:
        """:meth:`complete_many` sent without waiting for its commit: call the result for what it returns.

        With PostgreSQL on psycopg the statements go out in one pipeline (one transaction,
        one round trip) and the caller goes on while the database commits; the connection
        serves nothing else until that answer is read. Elsewhere the write happens now.
        """
        if self._hot is None or not items:
            written = self.complete_many(items)
            return lambda: written
        return self._complete_soon(self._hot, items)

    def _complete_soon(self, hot: _HotPath, items: Sequence[Completion]) -> Callable[[], set[uuid.UUID]]:
        # The batch's document is written here from each output's JSON text, as the column's type would write it.
        ordered = sorted(items, key=lambda item: item[0])
        to_json, statement = self._to_json, self._hot_complete_many
        done = ",".join(
            f'{{"id":"{cid}","attempt":{attempt},"output":{to_json(output)}}}' for cid, attempt, output in ordered
        )
        values = statement.values({"p_ids": [cid for cid, _, _ in ordered], "p_done": f"[{done}]"})
        sent = hot.send_each(False, statement, [values], BY_KEY_ONLY.encode())

        def answer() -> set[uuid.UUID]:
            [rows] = sent.wait()
            self.settle_batches(batch_id for _, batch_id in rows)
            return {cid for cid, _ in rows}

        return answer

    @functools.cached_property
    def _to_json(self) -> Callable[[Any], str]:
        """An output as JSON text, by the engine's JSON serializer (``create_engine(json_serializer=)``) if it has
        one, as the ``output`` column's type writes it."""
        serializer: Callable[[Any], str] | None = getattr(self.engine.dialect, "_json_serializer", None)
        return serializer or json.dumps

    @functools.cached_property
    def _complete_many_stmt(self) -> sa.Update:
        """Successes of many attempts in ONE statement (PostgreSQL): ``p_ids``, their ids (an array), and ``p_done``,
        a JSON array of ``{id, attempt, output}``; each row fenced as in :meth:`complete`. Half of PostgreSQL's work
        per success of one fenced ``UPDATE`` each, pipelined (0.025 against 0.057 ms a row in batches of 20).

        Run after :data:`BY_KEY_ONLY`, in its transaction, its rows are reached by ``id = ANY(p_ids)`` over the
        primary key whatever the table's statistics (see there); the join with the document then only pairs them.
        """
        t = self.table
        done, fence = self._p_fence_many(Status.RUNNING, "done", sa.column("output", t.c.output.type))
        return (
            sa.update(t)
            .where(*fence)
            .values(
                status=Status.COMPLETED,
                outcome=AttemptOutcome.SUCCESS,
                output=done.c.output,
                finished_at=self._p_now(),
                lease_expires_at=None,
                **_NO_ERROR,
            )
            .returning(t.c.id, t.c.batch_id)
        )

    @functools.cached_property
    def _complete_stmt(self) -> sa.Update:
        t = self.table
        return (
            sa.update(t)
            .where(*self._p_fence(Status.RUNNING))
            .values(
                status=Status.COMPLETED,
                outcome=AttemptOutcome.SUCCESS,
                output=sa.bindparam("p_output", type_=t.c.output.type),
                finished_at=self._p_now(),
                lease_expires_at=None,
                **_NO_ERROR,
            )
            .returning(t.c.batch_id)
        )

    def fail(
        self,
        command_id: uuid.UUID,
        attempt: int,
        outcome: str,
        error: ErrorInfo,
        children: Sequence[Row] | Plan,
        lapsed_only: bool = False,
    ) -> bool:
        """Record a final failure and insert the on-failure commands, in one transaction; False if fenced out."""
        values = {"status": Status.FAILED, "outcome": outcome, **_error_values(error)}
        return self._finish(command_id, attempt, values, children, lapsed_only)

    def retry(
        self,
        command_id: uuid.UUID,
        attempt: int,
        outcome: str,
        error: ErrorInfo,
        delay: float,
        lapsed_only: bool = False,
    ) -> bool:
        """Put a failed attempt back to pending, due after ``delay`` seconds, one retry fewer; False if fenced out.

        ``lapsed_only``: the rescuer's form, which also requires the lease to have run out.
        """
        t = self.table
        stmt = (
            sa.update(t)
            .where(*self._fence(command_id, attempt, lapsed_only), t.c.retries_left > 0)
            .values(
                status=Status.PENDING,
                outcome=outcome,
                retries_left=t.c.retries_left - 1,
                scheduled_at=self._later(delay),
                lease_expires_at=None,
                **_error_values(error),
            )
        )
        with self._one() as conn:
            return conn.execute(stmt).rowcount == 1

    def not_found(self, command_id: uuid.UUID, attempt: int, error: ErrorInfo, delay: float) -> str | None:
        """Record a dispatched attempt that no worker knows how to run: retry, or fail when none are left.

        Returns the new status, or None if the attempt was no longer dispatched.
        """
        t = self.table
        fence = (t.c.id == command_id, t.c.status == Status.DISPATCHED, t.c.attempt == attempt)
        common = {"outcome": AttemptOutcome.NOT_FOUND, "lease_expires_at": None, **_error_values(error)}
        with self._tx() as conn:
            retried = conn.execute(
                sa.update(t)
                .where(*fence, t.c.retries_left > 0)
                .values(
                    status=Status.PENDING, retries_left=t.c.retries_left - 1, scheduled_at=self._later(delay), **common
                )
            ).rowcount
            if retried:
                return Status.PENDING
            failed = conn.execute(
                sa.update(t)
                .where(*fence)
                .values(status=Status.FAILED, finished_at=self._now(), **common)
                .returning(t.c.batch_id)
            ).first()
        if failed is None:
            return None
        self.settle_batches([failed.batch_id])
        return Status.FAILED

    def heartbeat(self, command_id: uuid.UUID, attempt: int, lease: float) -> tuple[bool, bool]:
        """Extend a running attempt's lease to now + ``lease``: (still held, cancellation requested)."""
        t = self.table
        stmt = (
            sa.update(t)
            .where(*self._fence(command_id, attempt))
            .values(lease_expires_at=self._later(lease))
            .returning(t.c.cancel_requested_at)
        )
        with self._one(relaxed=True) as conn:
            row = conn.execute(stmt).first()
        return (False, False) if row is None else (True, row.cancel_requested_at is not None)

    def cancel_requested(self, command_id: uuid.UUID, attempt: int) -> bool:
        """Whether a cancellation was requested for this running attempt."""
        t = self.table
        stmt = sa.select(t.c.cancel_requested_at).where(*self._fence(command_id, attempt))
        with self._one() as conn:
            return conn.execute(stmt).scalar_one_or_none() is not None

    def cancel_requests(self, attempts: Sequence[tuple[uuid.UUID, int]]) -> set[tuple[uuid.UUID, int]]:
        """Of these running attempts, the ones whose cancellation was requested."""
        if not attempts:
            return set()
        t = self.table
        stmt = sa.select(t.c.id, t.c.attempt).where(
            t.c.id.in_([a[0] for a in attempts]), t.c.status == Status.RUNNING, t.c.cancel_requested_at.is_not(None)
        )
        with self._one() as conn:
            found = {(r.id, r.attempt) for r in conn.execute(stmt)}
        return found & set(attempts)

    def canceled(
        self, command_id: uuid.UUID, attempt: int, children: Sequence[Row] | Plan, lapsed_only: bool = False
    ) -> bool:
        """Record a running attempt as canceled and insert the on-cancel commands, in one transaction."""
        values = {"status": Status.CANCELED, "outcome": AttemptOutcome.CANCELED, "output": None, **_NO_ERROR}
        return self._finish(command_id, attempt, values, children, lapsed_only)

    def _finish(
        self,
        command_id: uuid.UUID,
        attempt: int,
        values: dict[str, Any],
        children: Sequence[Row] | Plan,
        lapsed_only: bool = False,
    ) -> bool:
        """One fenced move to a final state with its chained commands; then the command's batch is settled.

        The batch is settled after the commit, in a transaction of its own: whichever
        member commits last sees every member final (see :meth:`settle_batches`).
        """
        t = self.table
        stmt = (
            sa.update(t)
            .where(*self._fence(command_id, attempt, lapsed_only))
            .values(finished_at=self._now(), lease_expires_at=None, **values)
            .returning(t.c.batch_id)
        )
        if not children:
            with self._one() as conn:
                row = conn.execute(stmt).first()
        else:
            with self._tx() as conn:
                row = conn.execute(stmt).first()
                if row is None:
                    conn.rollback()
                    return False
                self.insert(conn, children, strict=False, now=self._tx_now(conn))
        if row is None:
            return False
        self.settle_batches([row.batch_id])
        return True

    def cancel(self, command_id: uuid.UUID, children_for: Any) -> tuple[str, int] | None:
        """Cancel a command, in one transaction; returns (the status it had, its attempt), or None if final.

        Pending or dispatched: ``canceled`` now, with its on-cancel commands
        (``children_for(name, input)`` gives their rows). Running: the cancellation is
        requested (``cancel_requested_at``); the attempt's worker records ``canceled``.
        """
        t = self.table
        with self._tx() as conn:
            row = conn.execute(
                sa.select(t.c.status, t.c.name, t.c.input, t.c.attempt)
                .where(t.c.id == command_id, t.c.status.in_(UNFINISHED))
                .with_for_update()
            ).first()
            if row is None:
                return None
            if row.status == Status.RUNNING:
                conn.execute(
                    sa.update(t)
                    .where(t.c.id == command_id, t.c.status == Status.RUNNING, t.c.cancel_requested_at.is_(None))
                    .values(cancel_requested_at=self._now())
                )
                return Status.RUNNING, int(row.attempt)
            batch_id = conn.execute(
                sa.update(t)
                .where(
                    t.c.id == command_id,
                    t.c.status == row.status,
                    t.c.status.in_((Status.PENDING, Status.DISPATCHED)),
                )
                .values(
                    status=Status.CANCELED,
                    outcome=AttemptOutcome.CANCELED,
                    finished_at=self._now(),
                    lease_expires_at=None,
                )
                .returning(t.c.batch_id)
            ).scalar_one()
            self.insert(conn, children_for(row.name, row.input), strict=False, now=self._tx_now(conn))
        self.settle_batches([batch_id])
        return str(row.status), int(row.attempt)
