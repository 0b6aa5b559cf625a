"""The store's foundation: engines, transactions, the clock in SQL, the row types that cross rooms."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite

from ..canvas import Plan
from ..clock import Clock, utcnow
from ..errors import OutboxError, StoreUnavailable
from ..schema import (
    UTCDateTime,
    batches_table,
    commands_table,
    metadata_for,
    pauses_table,
    schedules_table,
    workers_table,
)
from ..states import Status
from .hotpath import _HotPath

if TYPE_CHECKING:
    from ..flow import Plan as FlowPlan

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Dispatch:
    """A claimed row, ready to be published as a Celery task message."""

    id: uuid.UUID
    name: str
    target: str
    attempt: int
    input: dict[str, Any]
    timeout: float
    priority: int
    #: the command's expiry: the message carries it as Celery's ``expires``, so a worker drops it unopened
    expires_at: datetime | None = None
    retries: int = 0
    retries_left: int = 0
    #: the push's trace context (``traceparent``/``tracestate``), when one was recorded
    trace: dict[str, str] | None = None


#: Sent first in the transaction of a statement over many rows named by id (a batch of successes, a group of
#: starts): it is planned once for any values (a generic plan: the fence's status stays a parameter, so no partial
#: index over one status looks like a way in) and reaches its rows by an index only. It joins a JSON document
#: PostgreSQL estimates at 100 rows; planned as it came, a hash join over a sequential scan looked cheaper than
#: probing the primary key on tables of up to tens of thousands of rows (analysed or not), and each batch of ten
#: successes read the whole table; a custom plan of a fresh table walked every running row. With sequential scans
#: off, ``id = ANY(ids)`` over the primary key is the way in.
BY_KEY_ONLY = (
    "SELECT set_config('plan_cache_mode', 'force_generic_plan', true), set_config('enable_seqscan', 'off', true)"
)


@dataclass(frozen=True)
class Started:
    """What a worker learns when it claims an attempt (dispatched → running)."""

    id: uuid.UUID
    name: str
    target: str
    attempt: int
    input: dict[str, Any]
    timeout: float
    retries: int
    retries_left: int
    tenant: str | None = None
    batch_id: uuid.UUID | None = None
    chain: list[dict[str, Any]] | None = None
    #: when the command was due (the queue lag is measured from it)
    scheduled_at: datetime | None = None


@dataclass(frozen=True)
class ErrorInfo:
    """Why an attempt did not succeed."""

    type: str
    message: str
    traceback: str | None = None


@dataclass(frozen=True)
class Lapsed:
    """A running row whose lease ran out (its worker died or hung), or whose worker's registry row did."""

    id: uuid.UUID
    name: str
    attempt: int
    input: dict[str, Any]
    retries: int
    retries_left: int
    cancel_requested: bool
    #: None for a command, ``"job"`` for a job (a lost job is restarted without using a retry)
    kind: str | None = None


def oldest_first(row: Any) -> tuple[int, int]:
    """Claim order of claimed rows: higher priority first, then oldest (ids are time-ordered; compared as ints,
    since a UUID's own comparison is Python code)."""
    return -row.priority, row.id.int


def make_engine(url: str, **options: Any) -> sa.Engine:
    """An engine for the outbox database, tuned for the outbox's access pattern.

    ``postgresql://`` URLs get the psycopg 3 driver. SQLite gets WAL and ``BEGIN
    IMMEDIATE`` transactions: writers queue on the database lock at BEGIN instead of
    failing on a lock upgrade halfway through.
    """
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        options.setdefault("connect_args", {}).setdefault("timeout", 30)
        engine = sa.create_engine(url, **options)
        _tune_sqlite(engine)
        return engine
    options.setdefault("pool_size", 5)
    options.setdefault("max_overflow", 10)
    return sa.create_engine(url, **options)


def _tune_sqlite(engine: sa.Engine) -> None:
    @event.listens_for(engine, "do_connect")
    def _make_folder(_dialect: Any, _record: Any, cargs: Any, _cparams: Any) -> None:
        """The SQLite file's folder is made at the first connection (declaring a command makes none)."""
        database = engine.url.database
        if database and database != ":memory:" and not database.startswith("file:"):
            folder = os.path.dirname(os.path.abspath(database))
            os.makedirs(folder, exist_ok=True)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")  # the attempt history goes with its command
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _dialect_insert(conn: sa.Connection) -> Any:
    """The INSERT construct with ON CONFLICT for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert
    if conn.dialect.name == "sqlite":
        return sqlite.insert
    raise OutboxError(f"the outbox supports PostgreSQL and SQLite, not {conn.dialect.name}")  # pragma: no cover


def _seconds_between(start: Any, end: Any, dialect: str) -> sa.ColumnElement[Any]:
    if dialect == "postgresql":
        return sa.func.extract("epoch", end - start)
    return (sa.func.julianday(end) - sa.func.julianday(start)) * 86400.0


_NO_ERROR: dict[str, Any] = {"error_type": None, "error_message": None, "error_traceback": None}


def _error_values(error: ErrorInfo) -> dict[str, Any]:
    return {
        "error_type": error.type[:200],
        "error_message": error.message,
        "error_traceback": error.traceback,
    }


log = logging.getLogger("orch_outbox.store")


class StoreBase:
    """Engines, transactions and the clock every room of the store shares."""

    def __init__(
        self, engine: sa.Engine, prefix: str = "orch_", clock: Clock | None = None, relaxed: bool = False
    ) -> None:
        self.engine = engine
        self.prefix = prefix
        self.table = commands_table(prefix)
        self.batches = batches_table(prefix)
        self.schedules = schedules_table(prefix)
        self.pauses = pauses_table(prefix)
        self.workers = workers_table(prefix)
        #: sees every batch of rows about to be inserted (the telemetry sets it)
        self.on_insert: Callable[[list[dict[str, Any]], int], None] | None = None
        self.metadata = metadata_for(prefix)
        self._clock = clock
        self._db_clock = clock is None and engine.dialect.name == "postgresql"
        # One-statement transactions run in autocommit on PostgreSQL: the statement is
        # atomic on its own, and BEGIN + COMMIT would cost two more round trips each.
        self._autocommit = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else None
        )
        # Claims, attempt starts and heartbeats may commit without waiting for the WAL
        # flush (synchronous_commit=off, on a small pool of their own). If PostgreSQL
        # crashes and loses such a commit, the row is back where it was: a lost claim or
        # start returns to pending when its dispatch lease lapses, and its message, if it
        # ran, cannot record an outcome (fenced) - the attempt is redone, which is the
        # at-least-once promise anyway. Pushes and outcomes are never relaxed.
        self._relaxed: sa.Engine | None = None
        if relaxed and self._autocommit is not None:
            self._relaxed = sa.create_engine(
                engine.url,
                isolation_level="AUTOCOMMIT",
                pool_size=2,
                max_overflow=8,
                connect_args={"options": "-c synchronous_commit=off"},
            )

        # The executor's per-command statements bypass SQLAlchemy's execution layer on
        # psycopg (see _HotPath); with an injected clock they keep the general path.
        self._insert_sql: dict[tuple[str, ...], str] = {}
        self._hot: _HotPath | None = None
        if self._db_clock and engine.dialect.driver == "psycopg":
            self._hot = _HotPath(engine)

    @property
    def can_listen(self) -> bool:
        """True when commits of new commands are announced with NOTIFY (PostgreSQL)."""
        return self.engine.dialect.name == "postgresql"

    if TYPE_CHECKING:  # statements of other rooms that several rooms use; the one Store class has them all

        def insert(
            self, conn: sa.Connection, rows: Sequence[Row] | Plan, strict: bool = True, now: datetime | None = None
        ) -> list[uuid.UUID]: ...

        def settle_batches(self, batch_ids: Iterable[uuid.UUID | None]) -> int: ...

        def _claim_update(self, found: sa.ColumnElement[bool], recheck: bool = True) -> sa.Update: ...

        def _claim_locked(self, chosen: sa.CTE) -> sa.Update: ...

        def _row_address(self) -> list[sa.ColumnElement[Any]]: ...

        def tenants_lately(self) -> bool: ...

        def saw_tenants(self) -> None: ...

        def claim_flow(
            self, plan: FlowPlan, limit: int, dispatch_timeout: float, max_in_flight: int = 0
        ) -> tuple[list[Dispatch], list[Any]]: ...

        def _settle(self, conn: sa.Connection, batch_id: uuid.UUID) -> int: ...

    def after_fork(self) -> None:
        """In a forked child: drop the parent's pooled connections."""
        if self._relaxed is not None:
            self._relaxed.dispose(close=False)
        if self._hot is not None:
            self._hot._forget_inherited()

    def close(self) -> None:
        """Close the store's own connections (the relaxed pool, the hot path's)."""
        if self._relaxed is not None:
            self._relaxed.dispose()
        if self._hot is not None:
            self._hot.close()

    def clock(self) -> datetime:
        """The Python-side time this store uses when the database clock is not used."""
        return (self._clock or utcnow)()

    def _now(self) -> sa.ColumnElement[Any]:
        if self._db_clock:
            return sa.func.now()
        return sa.literal(self.clock(), UTCDateTime())

    def _later(self, seconds: float) -> sa.ColumnElement[Any]:
        if self._db_clock:
            return sa.func.now() + sa.literal(timedelta(seconds=seconds), sa.Interval())
        return sa.literal(self.clock() + timedelta(seconds=seconds), UTCDateTime())

    def _p_now(self) -> sa.ColumnElement[Any]:
        return sa.func.now() if self._db_clock else sa.bindparam("p_now", type_=UTCDateTime())

    def _p_later(self, name: str) -> sa.ColumnElement[Any]:
        if self._db_clock:
            return sa.func.now() + sa.bindparam(name, type_=sa.Interval())
        return sa.bindparam(name, type_=UTCDateTime())

    def _p_fence(self, status: str) -> list[sa.ColumnElement[bool]]:
        """The fence of a prebuilt statement: this command (``p_id``), in ``status``, under ``p_attempt``."""
        t = self.table
        return [
            t.c.id == sa.bindparam("p_id", type_=t.c.id.type),
            t.c.status == status,
            t.c.attempt == sa.bindparam("p_attempt", type_=sa.Integer()),
        ]

    def _p_fence_many(self, status: str, name: str, *columns: sa.ColumnClause[Any]) -> tuple[Any, list[Any]]:
        """The fence of a prebuilt statement over many commands (PostgreSQL), each in ``status`` under its attempt:
        their values as table ``name`` (``id``, ``attempt`` and ``columns``) read from the JSON document
        ``p_{name}``, and the conditions joining it, the rows reached by ``id = ANY(p_ids)`` (see BY_KEY_ONLY)."""
        t = self.table
        rows = (
            sa.func.jsonb_to_recordset(sa.bindparam(f"p_{name}", type_=t.c.input.type))
            .table_valued(sa.column("id", t.c.id.type), sa.column("attempt", sa.Integer()), *columns)
            .render_derived(name=name, with_types=True)
        )
        return rows, [
            t.c.id == sa.any_(sa.bindparam("p_ids", type_=postgresql.ARRAY(t.c.id.type))),
            t.c.id == rows.c.id,
            t.c.status == status,
            t.c.attempt == rows.c.attempt,
        ]

    def _p_times(self, **seconds: float) -> dict[str, Any]:
        if self._db_clock:
            return {name: timedelta(seconds=value) for name, value in seconds.items()}
        now = self.clock()
        return {"p_now": now, **{name: now + timedelta(seconds=value) for name, value in seconds.items()}}

    def now(self) -> datetime:
        """The store's current time (the database's on PostgreSQL)."""
        if not self._db_clock:
            return self.clock()
        with self._one() as conn:
            value = conn.execute(sa.select(sa.func.now())).scalar_one()
        return value  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        """A transaction on the store's engine; connection failures become StoreUnavailable."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreUnavailable(f"outbox database unavailable: {exc.orig or exc}") from exc

    @contextlib.contextmanager
    def _one(self, relaxed: bool = False) -> Iterator[sa.Connection]:
        """A connection for ONE statement, which is its own transaction (autocommit on PostgreSQL).

        ``relaxed``: the commit need not wait for the WAL flush (see ``__init__``).
        """
        engine = (self._relaxed if relaxed else None) or self._autocommit
        if engine is None:
            with self._tx() as conn:
                yield conn
            return
        try:
            with engine.connect() as conn:
                yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            raise StoreUnavailable(f"outbox database unavailable: {exc.orig or exc}") from exc

    def create_all(self) -> None:
        """Create the outbox tables if missing (tests and the embedded default; production uses migrations)."""
        with self._tx() as conn:
            self.metadata.create_all(conn)

    def missing_tables(self, conn: sa.Connection | None = None) -> list[str]:
        """The outbox tables the database lacks (run ``orch-outbox migrate``), read on ``conn`` or a connection of
        its own; StoreUnavailable if unreachable."""
        try:
            with contextlib.nullcontext(conn) if conn is not None else self.engine.connect() as on:
                inspector = sa.inspect(on)
                return [name for name in self.metadata.tables if not inspector.has_table(name)]
        except sa.exc.DBAPIError as exc:
            raise StoreUnavailable(str(exc.orig or exc).strip().splitlines()[0]) from exc

    def drop_all(self) -> None:
        """Drop the outbox tables (tests)."""
        with self._tx() as conn:
            self.metadata.drop_all(conn)

    def _fence(self, command_id: uuid.UUID, attempt: int, lapsed_only: bool = False) -> list[sa.ColumnElement[bool]]:
        """The guard of every write-back: this command, running, under this attempt."""
        t = self.table
        fence = [t.c.id == command_id, t.c.status == Status.RUNNING, t.c.attempt == attempt]
        if lapsed_only:
            fence.append(t.c.lease_expires_at < self._now())
        return fence

    def _select_lapsed(self) -> sa.Select[Any]:
        """The columns of a :class:`Lapsed` attempt (the rescuer's and the reaper's reads)."""
        t = self.table
        return sa.select(
            t.c.id,
            t.c.name,
            t.c.attempt,
            t.c.input,
            t.c.retries,
            t.c.retries_left,
            t.c.cancel_requested_at.is_not(None).label("cancel_requested"),
            t.c.kind,
        )

    def _paused(self) -> sa.ColumnElement[bool]:
        """True for a command row held back by a pause (everything, its target, or its tenant)."""
        t, p = self.table, self.pauses
        return sa.exists(
            sa.select(p.c.scope).where(
                sa.or_(
                    p.c.scope == "all",
                    sa.and_(p.c.scope == "target", p.c.value == t.c.target),
                    sa.and_(p.c.scope == "tenant", p.c.value == t.c.tenant),
                )
            )
        )

    def _stamp(
        self, rows: Sequence[Row], now: datetime | None = None, count: int | None = None
    ) -> list[dict[str, Any]]:
        """Fill created_at / scheduled_at; relative delays become absolute from one 'now'.

        Then ``on_insert(rows, count)`` sees them (the telemetry's create span puts its trace context on them):
        ``count`` rows will be made from these (more than these for a templated bulk push).
        """
        now = now or self.now_for_insert()
        out = []
        for row in rows:
            item = dict(row)
            delay = item.pop("delay", None)
            expires = item.pop("expires", None)
            item["created_at"] = now
            if item.get("scheduled_at") is None:
                item["scheduled_at"] = now + timedelta(seconds=delay or 0)
            if expires is not None:
                item["expires_at"] = now + timedelta(seconds=expires)
            out.append(item)
        if self.on_insert is not None:
            self.on_insert(out, len(out) if count is None else count)
        return out

    def _tx_now(self, conn: sa.Connection) -> datetime | None:
        """The database's time inside a transaction (None off PostgreSQL, where the store's clock is used).

        Chained commands are stamped with it: a worker's skewed clock must not delay them.
        """
        if not self._db_clock:
            return None
        value: datetime = conn.execute(sa.select(sa.func.now())).scalar_one()
        return value

    def now_for_insert(self) -> datetime:
        """Creation time of pushed rows.

        The Python clock: reading the database clock would cost the caller a round trip
        per push. Due times are compared with the database clock, so a host clock that
        runs ahead delays a command by its skew; one that runs behind makes it due early.
        """
        return self.clock()
