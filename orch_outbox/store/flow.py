"""The claim under flow control: cluster-wide limits and tenants in turns (the plan is in ``flow.py``).

On PostgreSQL each claim first takes a session advisory lock of this outbox on an
autocommit connection (released before the connection goes back to its pool), so the
claims of several relays under flow control follow one another and each one's counts,
read in a statement after the lock, include every claim committed before it: a limit
holds across the cluster, not per process. On SQLite the claim is one transaction. Then:
what is in flight per limited key, the rate buckets, the tenants with due rows (a skip
scan of an index over pending rows with a tenant, continuing after the tenant the last
claim ended on), a few due rows of each (those candidates are read in ``fair.py``), the
admission in Python, one UPDATE of the rows taken (re-checking that they are still
pending), and the buckets written back.
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..flow import EACH_TENANT, Plan, admit, fair_order, fresh_room
from ..schema import UTCDateTime, limits_table
from ..states import Status
from .base import Dispatch, oldest_first
from .fair import FairCandidates
from .hotpath import _CLAIMED

IN_FLIGHT = (Status.DISPATCHED, Status.RUNNING)


@dataclass
class Counts:
    """What the claim read of the commands in flight."""

    #: per limit key with a concurrency: dispatched or running
    in_flight: dict[str, int] = field(default_factory=dict)
    #: per target: published and not yet started (the in-flight cap)
    dispatched: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LimitState:
    """What ``orch-outbox status`` and the metrics show of one limit key."""

    key: str
    limit: str
    in_flight: int
    due: int
    #: True when the key has no room now: its due commands wait on it
    held: bool


class _Route(NamedTuple):
    """What the limits of a row depend on (see ``Plan.keys_of``)."""

    target: str
    name: str
    tenant: str | None


class FlowStatements(FairCandidates):
    """The claim under flow control, and what the limits hold back."""

    @functools.cached_property
    def limits(self) -> sa.Table:
        return limits_table(self.prefix)

    @functools.cached_property
    def _lock_key(self) -> int:
        return zlib.crc32(f"orch_outbox:{self.prefix}:claim".encode()) - 2**31

    def claim_flow(
        self,
        plan: Plan,
        limit: int,
        dispatch_timeout: float,
        max_in_flight: int = 0,
    ) -> tuple[list[Dispatch], list[Any]]:
        """Claim up to ``limit`` due rows under ``plan``; returns (dispatched, expired rows as claimed).

        When no limit is near (every key has room for a whole batch) and tenants need no
        turns, the rows are claimed by one statement that leaves out the keys with no
        room; otherwise candidates are read, admitted in Python, and claimed by id.
        """
        fair = plan.fair and self.tenants_lately()
        with self._claim_lock() as (conn, now):
            counts, buckets = self._read_state(conn, plan, max_in_flight, now)
            room = {key: self._room(plan, key, counts, buckets) for key in self._known_keys(plan, counts, buckets)}
            blocked = {key for key, n in room.items() if n <= 0}
            if plan.strict:
                blocked |= plan.held_by_order(self._waiting_targets(conn, plan.ordered_targets))
            if max_in_flight:
                blocked.update(target for target, n in counts.dispatched.items() if n >= max_in_flight)
            times = self._p_times(p_lease=dispatch_timeout)
            if not fair and self._ample(plan, room, counts, limit, max_in_flight):
                rows = self._claim_left_out(conn, {**self._left_out(plan, blocked), **times, "p_limit": limit})
                order = None
            else:
                params = {**self._left_out(plan, blocked), **self._p_times()}
                candidates = self._candidates(conn, params, self._left_out_where(), limit, fair)
                ordered = fair_order(candidates) if fair else candidates
                taken = admit(ordered, plan, room, limit, counts.dispatched, max_in_flight)
                if not taken:
                    return [], []
                rows = self._claim_taken(conn, {"p_ids": [c.id for c in taken], **times})
                order = {c.id: i for i, c in enumerate(taken)}
            claimed = [r for r in rows if r.status == Status.DISPATCHED]
            if order is None:  # as the plain claim
                claimed.sort(key=oldest_first)
            else:
                claimed.sort(key=lambda r: order[r.id])
            self._spend(conn, plan, buckets, claimed, now)
        if plan.fair and any(r.tenant is not None for r in rows):
            self.saw_tenants()
        return [_dispatch(r) for r in claimed], [r for r in rows if r.status == Status.EXPIRED]

    @contextlib.contextmanager
    def _claim_lock(self) -> Iterator[tuple[sa.Connection, datetime]]:
        """A connection holding this outbox's claim lock, and the claim's time.

        PostgreSQL: a session advisory lock on an autocommit connection (each statement
        commits on its own, the claim's UPDATE as the plain claim's does), released before
        the connection goes back to its pool; a connection lost drops its lock with it.
        SQLite: one transaction (SQLite has one writer).
        """
        if self.engine.dialect.name != "postgresql":
            with self._tx() as conn:
                yield conn, self.clock()
            return
        with self._one(relaxed=True) as conn:
            now = conn.exec_driver_sql(f"SELECT pg_advisory_lock({self._lock_key}), now()").one()[1]
            try:
                yield conn, (now if self._db_clock else self.clock())
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({self._lock_key})")

    def _ample(self, plan: Plan, room: dict[str, int], counts: Counts, limit: int, max_in_flight: int) -> bool:
        """True when no key and no target is near its limit: a whole batch fits in every one that has room."""
        if any(0 < n < limit for n in room.values()):
            return False
        each = plan.each_tenant
        if each is not None and fresh_room(plan, each.key) < limit:
            return False
        return not max_in_flight or all(
            n >= max_in_flight or n + limit <= max_in_flight for n in counts.dispatched.values()
        )

    def _left_out(self, plan: Plan, blocked: set[str]) -> dict[str, list[str]]:
        """The parameters naming the targets, commands and tenants with no room."""
        scoped: dict[str, list[str]] = {"target": [], "command": [], "tenant": []}
        for key in sorted(blocked):
            held = plan.find(key)
            scope = held.scope if held is not None else "target"  # a target at its in-flight cap
            scoped[scope].append(key if scope == "target" else key.split(":", 1)[1])
        return {
            "p_out_targets": scoped["target"],
            "p_out_commands": scoped["command"],
            "p_out_tenants": scoped["tenant"],
        }

    def _left_out_where(self, arrays: bool = False) -> list[sa.ColumnElement[bool]]:
        """Due rows, leaving out the targets, commands and tenants named (lists; PostgreSQL arrays if ``arrays``)."""
        t = self.table

        def not_in(column: Any, name: str) -> sa.ColumnElement[bool]:
            if arrays:
                return column != sa.all_(sa.bindparam(name, type_=postgresql.ARRAY(sa.String())))  # type: ignore[no-any-return]
            return column.not_in(sa.bindparam(name, expanding=True))  # type: ignore[no-any-return]

        return [
            t.c.status == Status.PENDING,
            t.c.kind.is_(None),
            t.c.scheduled_at <= self._p_now(),
            ~self._paused(),
            not_in(t.c.target, "p_out_targets"),
            not_in(t.c.name, "p_out_commands"),
            sa.or_(t.c.tenant.is_(None), not_in(t.c.tenant, "p_out_tenants")),
        ]

    def _claim_left_out(self, conn: sa.Connection, params: dict[str, Any]) -> list[Any]:
        """The one-statement claim of the rows of keys with room.

        On psycopg it runs on the hot path's own connection (committed at once, as the plain
        claim is) while ``conn`` holds the claim lock: the next flow claim takes the lock
        after this one's transaction ends, so it sees these rows dispatched all the same.
        """
        hot = self._hot_flow_claim if self._hot is not None else None
        return self._claim_rows(conn, hot, self._flow_claim(False), params)

    @functools.cached_property
    def _hot_flow_claim(self) -> tuple[str, dict[str, Any]]:
        assert self._hot is not None
        return self._hot.compile(self.engine, self._flow_claim(True))

    @functools.cache  # noqa: B019  (one store lives as long as its process)
    def _flow_claim(self, arrays: bool) -> sa.Update:
        """One statement: the first ``p_limit`` due rows of the keys with room, locked and skipped over by others."""
        t = self.table
        locked = (
            sa.select(t.c.id, *self._row_address())
            .where(*self._left_out_where(arrays))
            .order_by(t.c.priority.desc(), t.c.scheduled_at)
            .limit(sa.bindparam("p_limit", type_=sa.Integer()))
            .with_for_update(skip_locked=True)
            .cte("locked")
        )
        return self._claim_locked(locked)

    def _claim_taken(self, conn: sa.Connection, params: dict[str, Any]) -> list[Any]:
        """Claim the rows admitted (``p_ids``); on psycopg on the hot path's connection, as the one-statement claim."""
        hot = self._hot_flow_update if self._hot is not None else None
        return self._claim_rows(conn, hot, self._flow_update, params)

    def _claim_rows(
        self, conn: sa.Connection, hot: tuple[str, dict[str, Any]] | None, stmt: sa.Update, params: dict[str, Any]
    ) -> list[Any]:
        """Run a claim: ``hot`` (its SQL and constants) on the hot path's own connection, committed at once, or
        ``stmt`` on ``conn``; the claimed rows."""
        if self._hot is not None and hot is not None:
            sql, constants = hot
            rows = self._hot.execute_all(self._relaxed is not None, sql, {**params, **constants})
            return [_CLAIMED(*r) for r in rows]
        return [_CLAIMED(*r) for r in conn.execute(stmt, params)]

    @functools.cached_property
    def _hot_flow_update(self) -> tuple[str, dict[str, Any]]:
        assert self._hot is not None
        return self._hot.compile(self.engine, self._flow_update)

    @functools.cached_property
    def _flow_update(self) -> sa.Update:
        """Claim the rows admitted, by id (re-checked pending)."""
        t = self.table
        if self.engine.dialect.name == "postgresql":
            ids = t.c.id == sa.any_(sa.bindparam("p_ids", type_=postgresql.ARRAY(sa.Uuid())))
        else:
            ids = t.c.id.in_(sa.bindparam("p_ids", expanding=True))
        return self._claim_update(ids)

    def _waiting_targets(self, conn: sa.Connection, targets: list[str]) -> set[str]:
        """Of these targets, those with work waiting: a due pending command, or a message published and not started."""
        t = self.table
        probes = [
            sa.select(sa.literal(target, sa.String()).label("target")).where(
                sa.exists(
                    sa.select(t.c.id).where(
                        t.c.target == target,
                        t.c.kind.is_(None),
                        sa.or_(
                            t.c.status == Status.DISPATCHED,
                            sa.and_(t.c.status == Status.PENDING, t.c.scheduled_at <= self._now()),
                        ),
                    )
                )
            )
            for target in targets
        ]
        if not probes:
            return set()
        stmt = probes[0] if len(probes) == 1 else sa.union_all(*probes)
        return {r[0] for r in conn.execute(stmt)}

    # -- what is in flight, and the buckets ------------------------------------------------

    @functools.cache  # noqa: B019  (one store lives as long as its process)
    def _state_stmt(self, want_counts: bool, want_buckets: bool) -> sa.Select[Any] | sa.CompoundSelect[Any]:
        """The one read of ``_read_state``: in-flight counts, bucket rows, or both (UNION ALL)."""
        t, b = self.table, self.limits
        parts: list[sa.Select[Any]] = []
        if want_counts:
            parts.append(
                sa.select(
                    sa.literal("c").label("part"),
                    t.c.target.label("key"),
                    t.c.name,
                    t.c.tenant,
                    t.c.status,
                    sa.cast(sa.func.count(), sa.Float()).label("n"),
                    sa.cast(sa.null(), UTCDateTime()).label("updated_at"),
                )
                .where(t.c.status.in_(IN_FLIGHT), t.c.kind.is_(None))
                .group_by(t.c.target, t.c.name, t.c.tenant, t.c.status)
            )
        if want_buckets:
            nothing = sa.cast(sa.null(), sa.String())
            parts.append(sa.select(sa.literal("b"), b.c.key, nothing, nothing, nothing, b.c.tokens, b.c.updated_at))
        return parts[0] if len(parts) == 1 else sa.union_all(*parts)

    def _read_state(
        self, conn: sa.Connection, plan: Plan, max_in_flight: int, now: datetime
    ) -> tuple[Counts, dict[str, float]]:
        """One read: what is in flight (dispatched or running) per limited key and dispatched per target, and the
        tokens of each rate bucket now (refilled since its last claim, up to its capacity)."""
        counts, tokens = Counts(), {}  # type: tuple[Counts, dict[str, float]]
        want_counts = bool(max_in_flight) or any(lim.concurrency is not None for lim in plan.limits)
        want_buckets = any(lim.per_second is not None for lim in plan.limits)
        if not want_counts and not want_buckets:
            return counts, tokens
        stmt = self._state_stmt(want_counts, want_buckets)
        for part, key, name, tenant, status, n, updated_at in conn.execute(stmt):
            if part == "b":
                limit = plan.find(key)
                if limit is None or limit.per_second is None:
                    continue  # a bucket of a limit no longer configured
                elapsed = max(0.0, (now - updated_at).total_seconds())
                tokens[key] = min(plan.capacity(limit), n + elapsed * limit.per_second)
                continue
            n = int(n)
            if status == Status.DISPATCHED:
                counts.dispatched[key] = counts.dispatched.get(key, 0) + n
            keys = [key, f"command:{name}"] + ([f"tenant:{tenant}"] if tenant is not None else [])
            for k in keys:
                limit = plan.find(k)
                if limit is not None and limit.concurrency is not None:
                    counts.in_flight[k] = counts.in_flight.get(k, 0) + n
        return counts, tokens

    def _known_keys(self, plan: Plan, counts: Counts, buckets: dict[str, float]) -> set[str]:
        keys = {lim.key for lim in plan.limits if lim.key != EACH_TENANT}
        return keys | set(counts.in_flight) | set(buckets)

    def _room(self, plan: Plan, key: str, counts: Counts, buckets: dict[str, float]) -> int:
        limit = plan.limit_of(key)
        room: list[int] = []
        if limit.concurrency is not None:
            room.append(limit.concurrency - counts.in_flight.get(key, 0))
        if limit.per_second is not None:
            room.append(math.floor(buckets.get(key, plan.capacity(limit)) + 1e-9))
        return min(room)

    def _spend(
        self, conn: sa.Connection, plan: Plan, buckets: dict[str, float], claimed: Sequence[Any], now: datetime
    ) -> None:
        """Write back the buckets of the rate-limited keys the claim took from (a full, unused one is dropped)."""
        spent: dict[str, int] = {}
        if not any(lim.per_second is not None for lim in plan.limits):
            return
        # The keys of a row follow from its target, name and tenant: worked out once per combination, not per row.
        for route, n in Counter(_Route(row.target, row.name, row.tenant) for row in claimed).items():
            for key in plan.keys_of(route):
                if plan.limit_of(key).per_second is not None:
                    spent[key] = spent.get(key, 0) + n
        if not spent:
            return
        values = [
            {"key": key, "tokens": buckets.get(key, plan.capacity(plan.limit_of(key))) - n, "updated_at": now}
            for key, n in spent.items()
        ]
        conn.execute(self._upsert_bucket, values)
        full = [key for key, left in buckets.items() if key not in spent and left >= plan.capacity(plan.limit_of(key))]
        if full:
            conn.execute(sa.delete(self.limits).where(self.limits.c.key.in_(full)))

    @functools.cached_property
    def _upsert_bucket(self) -> Any:
        b = self.limits
        upsert = _dialect_insert_for(self.engine.dialect.name)(b)
        return upsert.on_conflict_do_update(
            index_elements=[b.c.key],
            set_={"tokens": upsert.excluded.tokens, "updated_at": upsert.excluded.updated_at},
        )

    # -- what the limits hold back ----------------------------------------------------------

    def limit_states(self, plan: Plan) -> list[LimitState]:
        """Per limit key: in flight, due and pending, and whether the key is at its limit now."""
        t = self.table
        with self._tx() as conn:
            now = self._tx_now(conn) or self.clock()
            counts, buckets = self._read_state(conn, plan, 0, now)
            states = []
            for key in sorted(self._known_keys(plan, counts, buckets)):
                limit = plan.limit_of(key)
                scope, value = limit.scope, key.split(":", 1)[1] if limit.scope != "target" else key
                column = {"target": t.c.target, "command": t.c.name, "tenant": t.c.tenant}[scope]
                due = conn.execute(
                    sa.select(sa.func.count()).where(
                        t.c.status == Status.PENDING,
                        t.c.kind.is_(None),
                        t.c.scheduled_at <= self._now(),
                        column == value,
                    )
                ).scalar_one()
                in_flight = counts.in_flight.get(key, 0)
                room = self._room(plan, key, counts, buckets)
                states.append(LimitState(key, limit.describe(), in_flight, due, room <= 0 and due > 0))
        return states


def _dialect_insert_for(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _dispatch(r: Any) -> Dispatch:
    return Dispatch(
        r.id,
        r.name,
        r.target,
        r.attempt,
        r.input,
        r.timeout,
        r.priority,
        r.expires_at,
        r.retries,
        r.retries_left,
        r.trace,
    )
