"""The store: the only module that talks SQL.

Every statement the outbox runs is a method here with a one-line purpose. Each state
change names the state (and, for a worker's write-back, the attempt) it expects, so a
late, duplicate or zombie writer changes nothing: it finds no row to update.

Time: on PostgreSQL, due times and leases are computed from the database's ``now()``,
so a host with a skewed clock changes nothing. On SQLite, which has no usable clock of
the right precision, and in tests that pass ``clock=``, the Python clock is used.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite

from . import canvas
from .canvas import Plan
from .clock import Clock, utcnow
from .errors import BatchClosed, BatchNotFound, OutboxError, StoreUnavailable, UniqueConflict
from .schema import (
    FINAL_STATUSES,
    UTCDateTime,
    batches_table,
    commands_table,
    metadata_for,
    notify_channel,
    pauses_table,
    schedules_table,
    unique_scope,
)
from .schema import (
    UNFINISHED_STATUSES as UNFINISHED,
)
from .uuid7 import uuid7

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


@dataclass(frozen=True)
class ErrorInfo:
    """Why an attempt did not succeed."""

    type: str
    message: str
    traceback: str | None = None


@dataclass(frozen=True)
class Lapsed:
    """A running row whose lease ran out: its worker died or hung."""

    id: uuid.UUID
    name: str
    attempt: int
    input: dict[str, Any]
    retries: int
    retries_left: int
    cancel_requested: bool


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
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


#: A claimed row as the claim statement returns it (its RETURNING list is these fields).
_CLAIMED = collections.namedtuple(
    "_CLAIMED", "id name target attempt input timeout priority status batch_id expires_at retries retries_left"
)

#: Connections a forked child inherited from its parent's hot path: kept referenced, never
#: closed or collected, because closing one would end the parent's session on the shared socket.
_INHERITED: list[Any] = []


class _HotPath:
    """The executor's two per-command statements on PostgreSQL, run on psycopg directly.

    ``start`` and ``complete`` run once per command on every worker. Through SQLAlchemy
    each costs a few hundred microseconds of worker CPU beyond the round trip (pool
    checkout and reset, events, execution context, result metadata); on a connection the
    thread keeps, as a prepared statement, about a third of that. The SQL is the same:
    it is compiled once from the store's SQLAlchemy statements.

    Each thread has its own connections (one per durability), made by the engine on
    first use (so its ``connect_args`` and ``connect`` events apply), then detached from
    its pool; replaced after a connection error. A forked child starts with none.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._conns: dict[tuple[int, bool], tuple[Any, Any]] = {}  # (thread, relaxed) -> (pool handle, cursor)
        self._pid = os.getpid()

    def compile(self, engine: sa.Engine, stmt: sa.Update) -> tuple[str, dict[str, Any]]:
        """The statement's SQL for psycopg and the values of its constant parameters."""
        compiled = stmt.compile(dialect=engine.dialect)
        return compiled.string, {k: v for k, v in compiled.params.items() if not k.startswith("p_")}

    def execute(self, relaxed: bool, sql: str, params: dict[str, Any]) -> Any:
        """Run one statement in autocommit on this thread's connection; its first row or None."""
        return self._run(relaxed, sql, params)[0]

    def execute_all(self, relaxed: bool, sql: str, params: dict[str, Any]) -> list[Any]:
        """Run one statement in autocommit on this thread's connection; all its rows."""
        return self._run(relaxed, sql, params)[1]

    def execute_each(self, relaxed: bool, sql: str, params: Sequence[dict[str, Any]]) -> list[Any]:
        """Run one statement per parameter set in ONE transaction and one round trip; each one's first row or None.

        A pipeline with a single sync at its end: PostgreSQL runs everything before a sync
        as one (implicit) transaction, so a failing statement rolls the others back.
        """
        import psycopg

        if len(params) == 1:
            return [self._run(relaxed, sql, params[0])[0]]
        cursor = self._cursor(relaxed)
        firsts: list[Any] = []
        try:
            with cursor.connection.pipeline():
                cursor.executemany(sql, params, returning=True)
            while True:
                firsts.append(cursor.fetchone())
                if not cursor.nextset():
                    break
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop(relaxed, cursor.connection)
            raise StoreUnavailable(f"outbox database unavailable: {exc}") from exc
        return firsts

    def _run(self, relaxed: bool, sql: str, params: dict[str, Any]) -> tuple[Any, list[Any]]:
        import psycopg

        cursor = self._cursor(relaxed)
        try:
            cursor.execute(sql, params, prepare=True)
            rows = cursor.fetchall()
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop(relaxed, cursor.connection)
            raise StoreUnavailable(f"outbox database unavailable: {exc}") from exc
        return (rows[0] if rows else None), rows

    def _cursor(self, relaxed: bool) -> Any:
        """This thread's cursor for ``relaxed`` (kept with its connection: a new one per statement costs)."""
        if os.getpid() != self._pid:
            self._forget_inherited()
        key = (threading.get_ident(), relaxed)
        held = self._conns.get(key)
        if held is not None and not held[1].connection.closed:
            return held[1]
        import psycopg

        # A connection made by the engine (its URL, connect_args and connect events, such
        # as a search_path), then taken out of its pool for this thread alone. The pool's
        # handle is kept: closing it closes the connection, dropping it would too.
        try:
            pooled = self._engine.raw_connection()
            conn: Any = pooled.driver_connection
            pooled.detach()
            conn.autocommit = True
            if relaxed:
                conn.execute("SET synchronous_commit = off")
        except (sa.exc.OperationalError, sa.exc.InterfaceError, psycopg.OperationalError) as exc:
            raise StoreUnavailable(f"outbox database unavailable: {exc}") from exc
        cursor = conn.cursor()
        with self._lock:
            self._close_dead_threads()
            self._conns[key] = (pooled, cursor)
        return cursor

    def _drop(self, relaxed: bool, conn: Any) -> None:
        with self._lock:
            held = self._conns.pop((threading.get_ident(), relaxed), None)
        with contextlib.suppress(Exception):
            (held[0] if held is not None else conn).close()

    def _close_dead_threads(self) -> None:
        alive = {t.ident for t in threading.enumerate()}
        for key in [k for k in self._conns if k[0] not in alive]:
            with contextlib.suppress(Exception):
                self._conns.pop(key)[0].close()

    def _forget_inherited(self) -> None:
        with self._lock:
            _INHERITED.extend(self._conns.values())
            self._conns.clear()
            self._pid = os.getpid()

    def close(self) -> None:
        """Close every connection this process made."""
        if os.getpid() != self._pid:
            self._forget_inherited()
            return
        with self._lock:
            held, self._conns = list(self._conns.values()), {}
        for pooled, _ in held:
            with contextlib.suppress(Exception):
                pooled.close()


#: Rows rendered per write of a COPY.
COPY_CHUNK_ROWS = 2_000

#: COPY text escapes: backslash first, then the separators.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


#: JSON for COPY text: ASCII only, so no raw tab or newline can reach the row.
_COPY_JSON = json.JSONEncoder(separators=(",", ":"))


def _insert_sql(template: str, table: str, columns: Sequence[str], raw: Any) -> str:
    """``template`` (``COPY {} ({}) …`` or ``INSERT INTO {} ({}) VALUES ({})``) with the table and columns quoted."""
    from psycopg import sql

    parts = [sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))]
    if template.count("{}") == 3:
        parts.append(sql.SQL(", ").join(sql.Placeholder() * len(columns)))
    return str(sql.SQL(template).format(*parts).as_string(raw))


class _CopyText:
    """Rows as PostgreSQL COPY text: tab-separated, ``\\N`` for NULL, with COPY's escapes.

    Columns go in the order ``id``, ``input``, then the rest. Rows of one bulk push share
    everything but their id and input (name, target, timeout, times...), so the rest is
    rendered once per template row and reused. JSON is dumped with ASCII escapes, so it
    holds no raw tab or newline; its backslashes are doubled for COPY.
    """

    def __init__(self, columns: Iterable[str], json_columns: frozenset[str]) -> None:
        self.json_columns = json_columns
        self.rest = sorted(set(columns) - {"id", "input"})
        self.columns = ["id", "input", *self.rest]
        self._rest_of: dict[int, tuple[Row, str]] = {}

    def line(self, template: Row, command_id: uuid.UUID, data: Any) -> str:
        """One row: ``template``'s values but for its id and input."""
        known = self._rest_of.get(id(template))
        if known is None or known[0] is not template:
            known = self._rest_of[id(template)] = (template, "\t".join([self.render(c, template) for c in self.rest]))
        if data is None:
            value = "\\N"
        else:  # JSON escapes every control character, tab and newline included: only backslashes need doubling
            value = (getattr(data, "text", None) or _COPY_JSON.encode(data)).replace("\\", "\\\\")
        return f"{command_id}\t{value}\t{known[1]}\n"

    def render(self, column: str, row: Row) -> str:
        value = row.get(column)
        if value is None:
            return "\\N"
        if column in self.json_columns:
            return _COPY_JSON.encode(value).replace("\\", "\\\\")
        if isinstance(value, bool):
            return "t" if value else "f"
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
            return value.isoformat()
        if isinstance(value, float):
            return repr(value)
        return str(value).translate(_COPY_ESCAPES)


def _raise_driver_error(exc: Exception, statement: str) -> NoReturn:
    """Raise a psycopg error of a statement sent on the caller's connection as SQLAlchemy would have.

    A lost connection is :class:`StoreUnavailable`, as everywhere in the store; any other
    database error becomes SQLAlchemy's exception of its kind (``IntegrityError``...),
    the one the caller's own statements raise.
    """
    import psycopg

    if isinstance(exc, psycopg.OperationalError):
        raise StoreUnavailable(f"outbox database unavailable: {exc}") from exc
    if isinstance(exc, psycopg.Error):
        raise sa.exc.DBAPIError.instance(statement, None, exc, psycopg.Error) from exc
    raise exc


@contextlib.contextmanager
def _savepoint(raw: Any) -> Iterator[None]:
    """A savepoint on the caller's psycopg connection, unseen by SQLAlchemy: an error inside rolls back to it."""
    raw.execute("SAVEPOINT orch_outbox_push")
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # a lost connection: the transaction is gone anyway
            raw.execute("ROLLBACK TO SAVEPOINT orch_outbox_push")
            raw.execute("RELEASE SAVEPOINT orch_outbox_push")
        raise
    raw.execute("RELEASE SAVEPOINT orch_outbox_push")


def _driver(conn: sa.Connection) -> Any:
    """The caller's psycopg connection, inside the caller's SQLAlchemy transaction.

    SQLAlchemy begins a Connection's transaction at its first statement ("commit as you
    go"). A statement sent to the driver directly does not count: the caller's
    ``conn.commit()`` would then commit nothing and closing the connection would roll the
    push back. So the transaction is begun first, as SQLAlchemy's own statement would.
    """
    if not conn.in_transaction():
        conn.begin()
    return conn.connection.driver_connection


class _PendingPushes:
    """Pushed rows written when their transaction runs its next statement, or commits.

    A push inside the caller's transaction costs the caller validation and encoding
    only; its INSERT goes with the transaction's next statement of any kind (so the
    transaction's own queries see the row, in the order things were done), before a
    savepoint is set, released or rolled back to, or at commit. The pushes made in
    between share one round trip. A rollback drops them with the rest of the
    transaction. Rows reach the database as they would have at push time: only the
    moment differs, and a database error (not bad input, which push refuses at once)
    is raised by that next statement or by the commit.

    One per process (``PENDING``), listening once to each engine that pushed: SQLAlchemy
    must see the transaction's statements, so SQL sent on the raw DBAPI connection
    (``conn.connection.cursor()``) after a push does not write it first.
    """

    _BEFORE = ("before_execute", "commit", "savepoint", "rollback_savepoint", "release_savepoint", "prepare_twophase")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: weakref.WeakKeyDictionary[sa.Connection, list[tuple[_RowWriter, list[Row]]]] = (
            weakref.WeakKeyDictionary()
        )
        self._engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()

    def add(self, conn: sa.Connection, rows: Sequence[Row], write: _RowWriter) -> None:
        """Hold ``rows`` for the caller's transaction on ``conn`` (begun now if it was not); ``write`` writes them."""
        self._listen(conn.engine)
        _driver(conn)
        with self._lock:
            held = self._held.setdefault(conn, [])
            if held and held[-1][0] == write:
                held[-1][1].extend(rows)
            else:
                held.append((write, list(rows)))

    def flush(self, conn: sa.Connection, *_: Any) -> None:
        """Write what ``conn``'s transaction holds, in push order (an event listener too: other arguments ignored)."""
        if not self._held:  # every statement of the app comes here: the usual case takes no lock
            return
        with self._lock:
            held = self._held.pop(conn, None)
        for write, rows in held or ():
            write(conn, rows)

    def _drop(self, conn: sa.Connection) -> None:
        if self._held:
            with self._lock:
                self._held.pop(conn, None)

    def _listen(self, engine: sa.Engine) -> None:
        with self._lock:
            if engine in self._engines:
                return
            self._engines.add(engine)
        for name in self._BEFORE:
            event.listen(engine, name, self.flush)
        event.listen(engine, "rollback", self._drop)


_RowWriter = Callable[[sa.Connection, Sequence[Row]], None]
PENDING = _PendingPushes()


class Store:
    """Named statements over the ``{prefix}commands`` table."""

    def __init__(
        self, engine: sa.Engine, prefix: str = "orch_", clock: Clock | None = None, relaxed: bool = False
    ) -> None:
        self.engine = engine
        self.prefix = prefix
        self.table = commands_table(prefix)
        self.batches = batches_table(prefix)
        self.schedules = schedules_table(prefix)
        self.pauses = pauses_table(prefix)
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

    # -- time ---------------------------------------------------------------------------

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

    # Hot statements are built once with bind parameters (building one costs more than
    # running it); these give their clock parts and the values to bind.

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

    # -- transactions -------------------------------------------------------------------

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

    # -- notifications ------------------------------------------------------------------

    @property
    def can_listen(self) -> bool:
        """True when commits of new commands are announced with NOTIFY (PostgreSQL)."""
        return self.engine.dialect.name == "postgresql"

    @contextlib.contextmanager
    def listen(self) -> Iterator[Callable[[float], bool]]:
        """LISTEN on a connection of its own; yields ``wait(timeout) -> bool`` (True: notified).

        Its own connection, never a pooled one: a listening connection that also ran
        queries would hold notifications back while a query runs.
        """
        if not self.can_listen:
            raise OutboxError("LISTEN needs PostgreSQL")
        import psycopg
        from psycopg import sql

        args = self.engine.url.translate_connect_args(username="user", database="dbname")
        args.update(self.engine.url.query)
        try:
            conn = psycopg.connect(autocommit=True, **args)
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(notify_channel(self.prefix))))
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot LISTEN: {exc}") from exc

        def wait(timeout: float) -> bool:
            try:
                return any(True for _ in conn.notifies(timeout=timeout, stop_after=1))
            except psycopg.OperationalError as exc:
                raise StoreUnavailable(f"LISTEN connection lost: {exc}") from exc

        try:
            yield wait
        finally:
            conn.close()

    # -- schema -------------------------------------------------------------------------

    def create_all(self) -> None:
        """Create the outbox tables if missing (tests and the embedded default; production uses migrations)."""
        with self._tx() as conn:
            self.metadata.create_all(conn)

    def drop_all(self) -> None:
        """Drop the outbox tables (tests)."""
        with self._tx() as conn:
            self.metadata.drop_all(conn)

    # -- push ---------------------------------------------------------------------------

    def insert(
        self, conn: sa.Connection, rows: Sequence[Row] | Plan, strict: bool = True, now: datetime | None = None
    ) -> list[uuid.UUID]:
        """Insert new command rows (and batches) on the caller's connection, inside the caller's transaction.

        On psycopg, fewer than ``COPY_MIN_ROWS`` plain rows are held and written with the
        transaction's next statement or its commit (:class:`_PendingPushes`); from that
        many, COPY writes at once. Returns each row's command id. A row with a ``unique_key`` that an unfinished
        command already holds is not inserted: its id is that command's (``strict``:
        only if name and input are the same, else :class:`UniqueConflict`).
        """
        if isinstance(rows, Plan):
            if rows.batches:
                now = now or self.now_for_insert()
                conn.execute(sa.insert(self.batches), [{**b, "created_at": now} for b in rows.batches])
            inserted = self.insert(conn, rows.rows, strict, now)
            members = {r.get("batch_id") for r in rows.rows}
            for batch in rows.batches:
                if batch["id"] not in members:  # an empty batch is finished at once
                    self._settle(conn, batch["id"])
            return inserted
        if not rows:
            return []
        stamped = self._stamp(rows, now)
        plain = [r for r in stamped if r.get("unique_key") is None]
        if len(plain) >= COPY_MIN_ROWS and conn.dialect.name == "postgresql":
            self._copy(conn, plain)
        elif plain and conn.dialect.driver == "psycopg":
            PENDING.add(conn, plain, self._write_rows)
        elif plain:
            conn.execute(sa.insert(self.table), plain)
        ids: list[uuid.UUID] = [r["id"] for r in stamped]
        for i, row in enumerate(stamped):
            if row.get("unique_key") is not None:
                ids[i] = self._insert_unique(conn, row, strict)
        return ids

    def insert_templated(
        self, conn: sa.Connection, items: Iterable[tuple[Row, uuid.UUID, Any]], count: int, templates: Sequence[Row]
    ) -> list[uuid.UUID]:
        """A bulk push given as ``count`` (template row, id, input): rows equal to their template but for id and input.

        ``templates``: the distinct template rows. From ``COPY_MIN_ROWS`` on PostgreSQL the
        rows go through COPY without being built one by one: each template is stamped and
        rendered once. Beyond one COPY chunk, the items are taken (and checked, see
        ``Outbox._templated_rows``) while the COPY writes, inside a savepoint that undoes
        the rows written if one is refused. Otherwise (and for rows with a unique key) this
        is :meth:`insert`.
        """
        if (
            count < COPY_MIN_ROWS
            or conn.dialect.name != "postgresql"
            or any(template.get("unique_key") is not None for template in templates)
        ):
            return self.insert(conn, [{**template, "id": cid, "input": data} for template, cid, data in items])
        now = self.now_for_insert()
        stamped = {id(template): self._stamp([template], now)[0] for template in templates}
        ids: list[uuid.UUID] = []

        def rows() -> Iterator[tuple[Row, uuid.UUID, Any]]:
            for template, cid, data in items:
                ids.append(cid)
                yield stamped[id(template)], cid, data

        columns = {c for stamp in stamped.values() for c in stamp}
        streamed = count > COPY_CHUNK_ROWS
        self._copy_lines(conn, columns, rows() if streamed else list(rows()), undo_on_error=streamed)
        return ids

    def _copy(self, conn: sa.Connection, rows: Sequence[Row]) -> None:
        """Many rows at once with PostgreSQL's COPY (rows of any shape)."""
        self._copy_lines(conn, {c for row in rows for c in row}, [(row, row["id"], row.get("input")) for row in rows])

    def _copy_lines(
        self,
        conn: sa.Connection,
        columns: set[str],
        rows: Iterable[tuple[Row, uuid.UUID, Any]],
        undo_on_error: bool = False,
    ) -> None:
        """COPY rows given as (row to take the other columns from, id, input), on the caller's transaction.

        Much cheaper per row than an INSERT; COPY fires the statement-level insert
        trigger too, so the relay is notified on commit as for an INSERT. The rows are
        rendered and sent a chunk at a time, so PostgreSQL stores one chunk while the
        next is made. ``undo_on_error``: inside a savepoint, so that an error while the
        rows are made (bad input) undoes what was written and leaves the transaction usable.
        """
        PENDING.flush(conn)  # earlier pushes of this transaction go first, as they were made
        text = _CopyText(columns, self._json_columns)
        raw = _driver(conn)
        statement = _insert_sql("COPY {} ({}) FROM STDIN", self.table.name, text.columns, raw)
        line = text.line
        rest = iter(rows)
        try:
            undo = _savepoint(raw) if undo_on_error else contextlib.nullcontext()
            with undo, raw.cursor() as cursor, cursor.copy(statement) as copy:
                while chunk := list(itertools.islice(rest, COPY_CHUNK_ROWS)):
                    copy.write("".join([line(*row) for row in chunk]))
        except Exception as exc:
            _raise_driver_error(exc, statement)

    def _write_rows(self, conn: sa.Connection, rows: Sequence[Row]) -> None:
        """Rows on the caller's psycopg connection, in the caller's transaction: prepared INSERTs, one round trip.

        The pushes of a transaction, written when it runs its next statement or commits
        (see :class:`_PendingPushes`). SQLAlchemy's execution layer would cost the caller
        more than the INSERT itself; the statement is built once per column set, and
        several rows of one set go as one pipelined ``executemany``.
        """
        from psycopg.types.json import Jsonb

        raw = _driver(conn)
        statement = ""
        shapes: dict[tuple[str, ...], list[Row]] = {}
        for row in rows:
            shapes.setdefault(tuple(sorted(row)), []).append(row)
        json_columns = self._json_columns
        try:
            for columns, same in shapes.items():
                if len(same) >= COPY_MIN_ROWS:
                    self._copy_lines(conn, set(columns), [(row, row["id"], row.get("input")) for row in same])
                    continue
                known = self._insert_sql.get(columns)
                if known is None:
                    known = _insert_sql("INSERT INTO {} ({}) VALUES ({})", self.table.name, columns, raw)
                    if len(self._insert_sql) < 64:
                        self._insert_sql[columns] = known
                statement = known
                values = [
                    [Jsonb(row[c]) if row[c] is not None and c in json_columns else row[c] for c in columns]
                    for row in same
                ]
                with raw.cursor() as cursor:
                    if len(values) == 1:
                        cursor.execute(statement, values[0], prepare=True)
                    else:
                        cursor.executemany(statement, values)
        except Exception as exc:
            _raise_driver_error(exc, statement)

    @functools.cached_property
    def _json_columns(self) -> frozenset[str]:
        return frozenset(c.name for c in self.table.c if isinstance(c.type, sa.JSON))

    def _insert_unique(self, conn: sa.Connection, row: Row, strict: bool) -> uuid.UUID:
        """INSERT ... ON CONFLICT DO NOTHING on the partial unique index, else the holder's id.

        On PostgreSQL a concurrent, uncommitted push of the same key makes this statement
        wait for that transaction: if it commits, its command is returned; if it rolls
        back, this row is inserted. A holder that finishes in between frees the key, so
        the insert is tried again (bounded).
        """
        t = self.table
        dialect = conn.dialect.name
        dialect_insert: Any
        if dialect == "postgresql":
            dialect_insert = postgresql.insert
        elif dialect == "sqlite":
            dialect_insert = sqlite.insert
        else:  # pragma: no cover - the outbox supports PostgreSQL and SQLite
            raise OutboxError(f"unique keys are not supported on {dialect}")
        stmt = (
            dialect_insert(t)
            .values(**row)
            .on_conflict_do_nothing(index_elements=[t.c.unique_key], index_where=unique_scope(t))
            .returning(t.c.id)
        )
        holder_query = sa.select(t.c.id, t.c.name, t.c.input).where(
            t.c.unique_key == row["unique_key"], unique_scope(t)
        )
        for _ in range(5):
            inserted = conn.execute(stmt).scalar_one_or_none()
            if inserted is not None:
                return uuid.UUID(str(inserted))
            holder = conn.execute(holder_query).first()
            if holder is None:
                continue  # the holder finished between the two statements: the key is free again
            if strict and (holder.name != row["name"] or holder.input != row["input"]):
                raise UniqueConflict(
                    f"unique key {row['unique_key']!r} is held by unfinished command {holder.id} "
                    f"({holder.name}) with a different input"
                )
            return uuid.UUID(str(holder.id))
        raise UniqueConflict(f"unique key {row['unique_key']!r}: its holder kept changing; try again")

    def _stamp(self, rows: Sequence[Row], now: datetime | None = None) -> list[dict[str, Any]]:
        """Fill created_at / scheduled_at; relative delays become absolute from one 'now'."""
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

    # -- relay --------------------------------------------------------------------------

    def claim(
        self,
        limit: int,
        dispatch_timeout: float,
        max_in_flight: int = 0,
        on_expired: Callable[[list[uuid.UUID]], None] | None = None,
    ) -> list[Dispatch]:
        """Claim up to ``limit`` due pending rows: each becomes dispatched with a new attempt.

        Claim order is priority, then due time. A claimed row past its ``expires_at``
        becomes ``expired`` instead and is not returned for publishing. ``max_in_flight``
        (0: no limit): targets with that many messages published and not yet started are
        skipped, so the backlog waits in the database (where it can be reordered and
        canceled) and no message waits in the broker past its dispatch lease.
        """
        params: dict[str, Any] = {"p_limit": limit}
        if max_in_flight:
            params["p_cap"] = max_in_flight
        if self._hot is not None:
            sql, constants = self._hot_claim_capped if max_in_flight else self._hot_claim
            params.update(constants, p_lease=timedelta(seconds=dispatch_timeout))
            rows: Sequence[Any] = self._hot.execute_all(self._relaxed is not None, sql, params)
            rows = [_CLAIMED(*row) for row in rows]
        else:
            with self._one(relaxed=True) as conn:
                stmt = self._claim_capped_stmt if max_in_flight else self._claim_stmt
                rows = conn.execute(stmt, {**params, **self._p_times(p_lease=dispatch_timeout)}).all()
        claimed = [
            Dispatch(
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
            )
            for r in rows
            if r.status == "dispatched"
        ]
        claimed.sort(key=lambda d: (-d.priority, d.id))  # within a priority, oldest first (ids are time-ordered)
        if len(claimed) < len(rows):
            self.settle_batches(r.batch_id for r in rows if r.status == "expired")
            if on_expired is not None:
                on_expired([r.id for r in rows if r.status == "expired"])
        return claimed

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

    @functools.cached_property
    def _hot_claim(self) -> tuple[str, dict[str, Any]]:
        assert self._hot is not None
        return self._hot.compile(self.engine, self._claim_stmt)

    @functools.cached_property
    def _hot_claim_capped(self) -> tuple[str, dict[str, Any]]:
        assert self._hot is not None
        return self._hot.compile(self.engine, self._claim_capped_stmt)

    @functools.cached_property
    def _claim_stmt(self) -> sa.Update:
        """The claim without an in-flight cap: the first ``p_limit`` due rows, locked and skipped over by others."""
        t = self.table
        locked = (
            sa.select(t.c.id)
            .where(t.c.status == "pending", t.c.scheduled_at <= self._p_now(), ~self._paused())
            .order_by(t.c.priority.desc(), t.c.scheduled_at)
            .limit(sa.bindparam("p_limit", type_=sa.Integer()))
            .with_for_update(skip_locked=True)
            .cte("locked")
        )
        return self._claim_update(sa.select(locked.c.id))

    @functools.cached_property
    def _claim_capped_stmt(self) -> sa.Update:
        """The claim under ``max_in_flight``: per target, at most ``p_cap`` dispatched and not yet started."""
        t = self.table
        now = self._p_now()
        cap = sa.bindparam("p_cap", type_=sa.Integer())
        in_flight = (
            sa.select(t.c.target, sa.func.count().label("n"))
            .where(t.c.status == "dispatched")
            .group_by(t.c.target)
            .cte("in_flight")
        )
        locked = (
            sa.select(t.c.id, t.c.target, t.c.priority, t.c.scheduled_at)
            .where(
                t.c.status == "pending",
                t.c.scheduled_at <= now,
                t.c.target.not_in(sa.select(in_flight.c.target).where(in_flight.c.n >= cap)),
                ~self._paused(),
            )
            .order_by(t.c.priority.desc(), t.c.scheduled_at)
            .limit(sa.bindparam("p_limit", type_=sa.Integer()))
            .with_for_update(skip_locked=True)
            .cte("locked")
        )
        # Of the rows locked, at most (cap - in flight) per target are claimed.
        rank = (
            sa.func.row_number()
            .over(partition_by=locked.c.target, order_by=(locked.c.priority.desc(), locked.c.scheduled_at))
            .label("rank")
        )
        ranked = (
            sa.select(locked.c.id, rank, sa.func.coalesce(in_flight.c.n, 0).label("n"))
            .select_from(locked.outerjoin(in_flight, in_flight.c.target == locked.c.target))
            .cte("ranked")
        )
        due = sa.select(ranked.c.id).where(ranked.c.rank + ranked.c.n <= cap).cte("due")
        return self._claim_update(sa.select(due.c.id))

    def _claim_update(self, ids: sa.Select[Any]) -> sa.Update:
        """Dispatch the rows ``ids`` selects (a new attempt each), or expire those past ``expires_at``."""
        t = self.table
        now = self._p_now()
        expired = sa.and_(t.c.expires_at.is_not(None), t.c.expires_at <= now)
        return (
            sa.update(t)
            .where(t.c.id.in_(ids))
            .values(
                status=sa.case((expired, "expired"), else_="dispatched"),
                outcome=sa.case((expired, "expired"), else_=t.c.outcome),
                finished_at=sa.case((expired, now), else_=None),
                attempt=sa.case((expired, t.c.attempt), else_=t.c.attempt + 1),
                dispatched_at=sa.case((expired, t.c.dispatched_at), else_=now),
                lease_expires_at=sa.case((expired, None), else_=self._p_later("p_lease")),
            )
            .returning(*(t.c[name] for name in _CLAIMED._fields))
        )

    def undispatch(self, items: Sequence[Dispatch]) -> int:
        """Return dispatched rows to pending after their publish failed (no retry consumed)."""
        if not items:
            return 0
        t = self.table
        stmt = (
            sa.update(t)
            .where(t.c.id == sa.bindparam("b_id"), t.c.status == "dispatched", t.c.attempt == sa.bindparam("b_attempt"))
            .values(status="pending", lease_expires_at=None)
        )
        with self._one(relaxed=True) as conn:
            result = conn.execute(stmt, [{"b_id": d.id, "b_attempt": d.attempt} for d in items])
        return result.rowcount

    def refuse(self, command_id: uuid.UUID, attempt: int, outcome: str, error: ErrorInfo) -> bool:
        """A claimed row that can never be published (not a command, malformed input): failed, no retry."""
        t = self.table
        stmt = (
            sa.update(t)
            .where(t.c.id == command_id, t.c.status == "dispatched", t.c.attempt == attempt)
            .values(
                status="failed",
                outcome=outcome,
                finished_at=self._now(),
                lease_expires_at=None,
                **_error_values(error),
            )
        )
        with self._one() as conn:
            batch_id = conn.execute(stmt.returning(t.c.batch_id)).first()
        if batch_id is None:
            return False
        self.settle_batches([batch_id[0]])
        return True

    # -- executor -----------------------------------------------------------------------

    def start(self, command_id: uuid.UUID, attempt: int, name: str, worker: str, lease: float) -> Started | None:
        """Claim one attempt for a worker (dispatched → running); None if it is not this attempt's to run."""
        params = {"p_id": command_id, "p_attempt": attempt, "p_name": name, "p_worker": worker}
        if self._hot is not None:
            sql, constants = self._hot_start
            hot_row = self._hot.execute(
                self._relaxed is not None, sql, {**constants, **params, "p_lease": timedelta(seconds=lease)}
            )
            return Started(*hot_row) if hot_row else None
        with self._one(relaxed=True) as conn:
            row = conn.execute(self._start_stmt, {**params, **self._p_times(p_lease=lease)}).first()
        return Started(**row._mapping) if row else None

    @functools.cached_property
    def _hot_start(self) -> tuple[str, dict[str, Any]]:
        assert self._hot is not None
        return self._hot.compile(self.engine, self._start_stmt)

    @functools.cached_property
    def _hot_complete(self) -> tuple[str, dict[str, Any], Callable[[Any], Any]]:
        assert self._hot is not None
        sql, constants = self._hot.compile(self.engine, self._complete_stmt)
        dialect = self.engine.dialect
        to_json = self.table.c.output.type.dialect_impl(dialect).bind_processor(dialect)
        return sql, constants, to_json or (lambda value: value)

    @functools.cached_property
    def _start_stmt(self) -> sa.Update:
        t = self.table
        return (
            sa.update(t)
            .where(
                *self._p_fence("dispatched"),
                t.c.name == sa.bindparam("p_name", type_=t.c.name.type),
                ~self._paused(),
                sa.or_(t.c.expires_at.is_(None), t.c.expires_at > self._p_now()),
            )
            .values(
                status="running",
                started_at=self._p_now(),
                lease_expires_at=self._p_later("p_lease"),
                worker=sa.bindparam("p_worker", type_=t.c.worker.type),
            )
            .returning(*(t.c[f.name] for f in dataclasses.fields(Started)))  # in Started's order
        )

    def expire(self, command_id: uuid.UUID, attempt: int) -> bool:
        """A dispatched attempt whose command expired before it started: ``expired``, nothing run or chained."""
        t = self.table
        stmt = (
            sa.update(t)
            .where(
                t.c.id == command_id,
                t.c.status == "dispatched",
                t.c.attempt == attempt,
                t.c.expires_at.is_not(None),
                t.c.expires_at <= self._now(),
            )
            .values(status="expired", outcome="expired", finished_at=self._now(), lease_expires_at=None)
            .returning(t.c.batch_id)
        )
        with self._one() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return False
        self.settle_batches([row.batch_id])
        return True

    def expire_dispatched(self, limit: int) -> list[uuid.UUID]:
        """Dispatched rows past their expiry whose message no worker started: ``expired`` now, not at their lease."""
        t = self.table
        due = (
            sa.select(t.c.id)
            .where(t.c.status == "dispatched", t.c.expires_at.is_not(None), t.c.expires_at <= self._now())
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("due")
        )
        stmt = (
            sa.update(t)
            .where(t.c.id.in_(sa.select(due.c.id)), t.c.status == "dispatched")
            .values(status="expired", outcome="expired", finished_at=self._now(), lease_expires_at=None)
            .returning(t.c.id, t.c.batch_id)
        )
        with self._one() as conn:
            rows = conn.execute(stmt).all()
        self.settle_batches(r.batch_id for r in rows)
        return [r.id for r in rows]

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
            .where(sa.tuple_(t.c.id, t.c.attempt).in_(list(attempts)), t.c.status == "running")
            .values(lease_expires_at=sa.case((t.c.lease_expires_at < later, later), else_=t.c.lease_expires_at))
            .returning(t.c.id, t.c.attempt, t.c.cancel_requested_at)
        )
        with self._one(relaxed=True) as conn:
            rows = conn.execute(stmt).all()
        return {(r.id, r.attempt): r.cancel_requested_at is not None for r in rows}

    def hold_back(self, command_id: uuid.UUID, attempt: int) -> bool:
        """A dispatched attempt whose command was paused before it started: back to pending, no retry used."""
        t = self.table
        stmt = (
            sa.update(t)
            .where(t.c.id == command_id, t.c.status == "dispatched", t.c.attempt == attempt, self._paused())
            .values(status="pending", lease_expires_at=None)
        )
        with self._one() as conn:
            return bool(conn.execute(stmt).rowcount == 1)

    def complete(self, command_id: uuid.UUID, attempt: int, output: Any, children: Sequence[Row] | Plan) -> bool:
        """Record success and insert the on-success commands, in one transaction; False if fenced out."""
        if children:
            values = {"status": "completed", "outcome": "success", "output": output, **_NO_ERROR}
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
            # One fenced primary-key UPDATE per success, pipelined in one transaction: one
            # round trip and one WAL flush, and no join for the planner to get wrong.
            sql, constants, to_json = self._hot_complete
            ordered = sorted(items, key=lambda item: item[0])
            firsts = self._hot.execute_each(
                False,
                sql,
                [
                    {**constants, "p_id": cid, "p_attempt": attempt, "p_output": to_json(output)}
                    for cid, attempt, output in ordered
                ],
            )
            recorded = [(cid, first) for (cid, _, _), first in zip(ordered, firsts, strict=True) if first is not None]
            self.settle_batches(first[0] for _, first in recorded)
            return {cid for cid, _ in recorded}
        t = self.table
        if self.engine.dialect.name != "postgresql":
            done = {cid for cid, attempt, output in items if self.complete(cid, attempt, output, [])}
            return done
        values = sa.values(
            sa.column("v_id", t.c.id.type),
            sa.column("v_attempt", sa.Integer()),
            sa.column("v_output", t.c.output.type),
            name="done",
        ).data(sorted(items, key=lambda item: item[0]))
        stmt = (
            sa.update(t)
            .where(t.c.id == values.c.v_id, t.c.status == "running", t.c.attempt == values.c.v_attempt)
            .values(
                status="completed",
                outcome="success",
                output=values.c.v_output,
                finished_at=self._now(),
                lease_expires_at=None,
                **_NO_ERROR,
            )
            .returning(t.c.id, t.c.batch_id)
        )
        with self._one() as conn:
            rows = conn.execute(stmt).all()
        self.settle_batches(r.batch_id for r in rows)
        return {r.id for r in rows}

    @functools.cached_property
    def _complete_stmt(self) -> sa.Update:
        t = self.table
        return (
            sa.update(t)
            .where(*self._p_fence("running"))
            .values(
                status="completed",
                outcome="success",
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
        values = {"status": "failed", "outcome": outcome, **_error_values(error)}
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
                status="pending",
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
        fence = (t.c.id == command_id, t.c.status == "dispatched", t.c.attempt == attempt)
        common = {"outcome": "not_found", "lease_expires_at": None, **_error_values(error)}
        with self._tx() as conn:
            retried = conn.execute(
                sa.update(t)
                .where(*fence, t.c.retries_left > 0)
                .values(status="pending", retries_left=t.c.retries_left - 1, scheduled_at=self._later(delay), **common)
            ).rowcount
            if retried:
                return "pending"
            failed = conn.execute(
                sa.update(t)
                .where(*fence)
                .values(status="failed", finished_at=self._now(), **common)
                .returning(t.c.batch_id)
            ).first()
        if failed is None:
            return None
        self.settle_batches([failed.batch_id])
        return "failed"

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
            t.c.id.in_([a[0] for a in attempts]), t.c.status == "running", t.c.cancel_requested_at.is_not(None)
        )
        with self._one() as conn:
            found = {(r.id, r.attempt) for r in conn.execute(stmt)}
        return found & set(attempts)

    def canceled(
        self, command_id: uuid.UUID, attempt: int, children: Sequence[Row] | Plan, lapsed_only: bool = False
    ) -> bool:
        """Record a running attempt as canceled and insert the on-cancel commands, in one transaction."""
        values = {"status": "canceled", "outcome": "canceled", "output": None, **_NO_ERROR}
        return self._finish(command_id, attempt, values, children, lapsed_only)

    def _fence(self, command_id: uuid.UUID, attempt: int, lapsed_only: bool = False) -> list[sa.ColumnElement[bool]]:
        """The guard of every write-back: this command, running, under this attempt."""
        t = self.table
        fence = [t.c.id == command_id, t.c.status == "running", t.c.attempt == attempt]
        if lapsed_only:
            fence.append(t.c.lease_expires_at < self._now())
        return fence

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

    # -- cancellation -------------------------------------------------------------------

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
            if row.status == "running":
                conn.execute(
                    sa.update(t)
                    .where(t.c.id == command_id, t.c.status == "running", t.c.cancel_requested_at.is_(None))
                    .values(cancel_requested_at=self._now())
                )
                return "running", int(row.attempt)
            batch_id = conn.execute(
                sa.update(t)
                .where(t.c.id == command_id, t.c.status == row.status)
                .values(status="canceled", outcome="canceled", finished_at=self._now(), lease_expires_at=None)
                .returning(t.c.batch_id)
            ).scalar_one()
            self.insert(conn, children_for(row.name, row.input), strict=False, now=self._tx_now(conn))
        self.settle_batches([batch_id])
        return str(row.status), int(row.attempt)

    # -- rescue -------------------------------------------------------------------------

    def release_lapsed_dispatches(self, limit: int) -> int:
        """Lapsed dispatch leases (the message never started): back to pending, no retry consumed."""
        t = self.table
        lapsed = (
            sa.select(t.c.id)
            .where(t.c.status == "dispatched", t.c.lease_expires_at < self._now())
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("lapsed")
        )
        stmt = (
            sa.update(t)
            .where(t.c.id.in_(sa.select(lapsed.c.id)), t.c.status == "dispatched")
            .values(status="pending", lease_expires_at=None)
            .returning(t.c.id)  # SQLite reports no row count for an UPDATE with a CTE
        )
        with self._one(relaxed=True) as conn:
            return len(conn.execute(stmt).all())

    def lapsed_runs(self, limit: int) -> list[Lapsed]:
        """Running rows whose lease ran out (read only; each is then settled by a fenced write)."""
        t = self.table
        stmt = (
            sa.select(
                t.c.id,
                t.c.name,
                t.c.attempt,
                t.c.input,
                t.c.retries,
                t.c.retries_left,
                t.c.cancel_requested_at.is_not(None).label("cancel_requested"),
            )
            .where(t.c.status == "running", t.c.lease_expires_at < self._now())
            .order_by(t.c.lease_expires_at)
            .limit(limit)
        )
        with self._one() as conn:
            return [Lapsed(**r._mapping) for r in conn.execute(stmt)]

    # -- batches ------------------------------------------------------------------------

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
        batch = conn.execute(sa.select(b).where(b.c.id == batch_id, b.c.status == "open").with_for_update()).first()
        if batch is None:
            return 0
        unfinished = conn.execute(
            sa.select(t.c.id).where(t.c.batch_id == batch_id, t.c.status.in_(UNFINISHED)).limit(1)
        ).first()
        if unfinished is not None:
            return 0
        now = self._tx_now(conn) or self.clock()
        conn.execute(sa.update(b).where(b.c.id == batch_id).values(status="finished", finished_at=now))
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
            broken = [m for m in members if m.status != "completed"]
        else:
            value = [canvas.outcome_of(m) for m in members]
        row = canvas.row_from_step(batch.continuation, value, batch.parent_id, batch.tenant)
        row["id"] = batch.continuation_id
        if broken:  # as in Celery, a chord whose header did not complete never calls its body
            row.update(
                status="failed",
                outcome="failure",
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
                b.c.status == "open",
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
            sa.update(b).where(b.c.id == batch_id, b.c.status == "open").values(status="open").returning(b.c.tenant)
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
            if batch.status != "open":
                return str(batch.status), 0, []
            now = self._tx_now(conn) or self.clock()
            canceled = conn.execute(
                sa.update(t)
                .where(t.c.batch_id == batch_id, t.c.status.in_(("pending", "dispatched")))
                .values(status="canceled", outcome="canceled", finished_at=now, lease_expires_at=None)
                .returning(t.c.id, t.c.name, t.c.input)
            ).all()
            children: list[Row] = []
            for row in canceled:
                children.extend(children_for(row.id, row.name, row.input))
            self.insert(conn, children, strict=False, now=now)
            running = conn.execute(
                sa.update(t)
                .where(t.c.batch_id == batch_id, t.c.status == "running", t.c.cancel_requested_at.is_(None))
                .values(cancel_requested_at=now)
                .returning(t.c.id, t.c.attempt)
            ).all()
            conn.execute(sa.update(b).where(b.c.id == batch_id).values(status="canceled", finished_at=now))
        return "open", len(canceled), [(r.id, int(r.attempt)) for r in running]

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
                    t.c.tenant == tenant, t.c.status == "completed", t.c.started_at.is_not(None)
                )
            ).scalar_one()
        return {
            "tenant": tenant,
            "commands": {str(s): int(n) for s, n in commands},
            "batches": {str(s): int(n) for s, n in batches},
            "mean_run_seconds": None if mean is None else float(mean),
        }

    # -- pause and resume ---------------------------------------------------------------

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

    # -- dead letter and retention ------------------------------------------------------

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
            .where(t.c.status == "failed", key_free, *self._filters(**filters))
            .values(
                status="pending",
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
        status = filters.pop("status", None) or "failed"
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
            t.c.batch_id.is_(None), ~sa.exists(sa.select(b.c.id).where(b.c.id == t.c.batch_id, b.c.status == "open"))
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
                    b.c.status != "open",
                    b.c.finished_at < cutoff,
                    ~sa.exists(sa.select(t.c.id).where(t.c.batch_id == b.c.id)),
                )
                .limit(limit)
                .scalar_subquery()
            )
            deleted += int(conn.execute(sa.delete(b).where(b.c.id.in_(old_batches))).rowcount)
        return deleted

    # -- schedules ----------------------------------------------------------------------

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

    # -- reading ------------------------------------------------------------------------

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

    def unfinished(self) -> int:
        """How many commands are not in a final state, plus the batches still open.

        An open batch counts because its continuation is still to come: between its last
        member's commit and the settle, no command is unfinished, yet work remains.
        """
        t, b = self.table, self.batches
        commands = sa.select(sa.func.count()).where(t.c.status.not_in(FINAL_STATUSES)).scalar_subquery()
        batches = sa.select(sa.func.count()).where(b.c.status == "open").scalar_subquery()
        with self._one() as conn:
            return int(conn.execute(sa.select(commands + batches)).scalar_one())


#: From this many rows in one push, PostgreSQL gets them through COPY instead of INSERT.
COPY_MIN_ROWS = 50
log = logging.getLogger("orch_outbox.store")


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
