"""The executor's and the relay's per-command statements on psycopg directly, as prepared statements."""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import select
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from ..errors import StoreUnavailable
from ..pid import current as current_pid

#: A claimed row as the claim statement returns it (its RETURNING list is these fields).
_CLAIMED = collections.namedtuple(
    "_CLAIMED",
    "id name target attempt input timeout priority status batch_id expires_at retries retries_left trace tenant",
)


@dataclass(frozen=True)
class Prepared:
    """A per-command statement sent through libpq itself: prepared once per connection, executed by name.

    ``sql`` has ``$n`` placeholders for ``params`` (in that order). The statement's own
    constants (statuses, scopes) stay parameters too, with their values kept here: a
    status written into the SQL would let the generic plan of a prepared statement reach
    the row through a partial index over that status, walking every row in it, where the
    primary key finds the one row. Values travel as text, so one call costs a libpq round
    trip (the GIL released while it waits) and the loading of the rows it returns.
    """

    name: bytes
    sql: bytes
    params: tuple[str, ...]
    #: the type of each parameter (0: inferred by the server from the statement)
    types: tuple[int, ...]
    #: the constants' values, as text
    constants: Mapping[str, bytes | None]

    def values(self, given: Mapping[str, Any]) -> list[bytes | None]:
        """The parameters in statement order, as text (the constants' filled in once, in :attr:`_template`)."""
        values = list(self._template)
        for index, name in self._given:
            values[index] = _text(given[name])
        return values

    @functools.cached_property
    def _template(self) -> tuple[bytes | None, ...]:
        return tuple(self.constants.get(name) for name in self.params)

    @functools.cached_property
    def _given(self) -> tuple[tuple[int, str], ...]:
        return tuple((i, name) for i, name in enumerate(self.params) if name not in self.constants)


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
#: Types the server cannot infer from the statement: given to PREPARE.
_TYPE_OIDS: dict[type, int] = {timedelta: 1186}


def prepared(engine: sa.Engine, stmt: sa.ClauseElement, name: str, types: Mapping[str, type] = {}) -> Prepared:
    """``stmt`` compiled for libpq: every parameter becomes ``$n``; those not named ``p_*`` are its constants."""
    compiled = stmt.compile(dialect=engine.dialect)
    constants = {k: _text(v) for k, v in compiled.params.items() if not k.startswith("p_")}
    order: list[str] = []

    def place(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in order:
            order.append(key)
        return f"${order.index(key) + 1}"

    sql = _PLACEHOLDER.sub(place, compiled.string).replace("%%", "%")
    oids = tuple(_TYPE_OIDS.get(types[key], 0) if key in types else 0 for key in order)
    return Prepared(f"orch_{name}".encode(), sql.encode(), tuple(order), oids, constants)


def _text(value: Any) -> bytes | None:
    """A parameter's value as PostgreSQL's text input reads it."""
    kind = type(value)
    if kind is str:
        return value.encode()  # type: ignore[no-any-return]
    if kind is int or kind is uuid.UUID:
        return str(value).encode()
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, (uuid.UUID, int, float)):
        return str(value).encode()
    if isinstance(value, timedelta):
        return f"{value.total_seconds()!r} seconds".encode()
    if isinstance(value, datetime):
        return value.isoformat().encode()
    if isinstance(value, (list, tuple)) and all(type(v) in (uuid.UUID, int) for v in value):  # an array of keys
        return ("{" + ",".join(map(str, value)) + "}").encode()
    raise TypeError(f"no text form for a parameter of type {type(value).__name__}")


@dataclass(eq=False)
class _Held:
    """A thread's connection: the pool's handle, a cursor, the statements prepared on it, its row loader."""

    pooled: Any
    cursor: Any
    loader: Any
    prepared: set[bytes] = field(default_factory=set)
    #: statements sent on it and not read yet: read before the connection is used again
    inflight: InFlight | None = None
    #: when (monotonic) its statements are prepared again, planned on the table as it is then (see ``REPLAN_SECONDS``)
    replan_at: float = field(default_factory=lambda: time.monotonic() + REPLAN_SECONDS)


#: Seconds a hot-path connection keeps its prepared statements. PostgreSQL keeps the generic plan
#: it made at a statement's sixth run until the table is analysed again: made while a quiet outbox
#: held a few rows, a start's was a sequential scan, kept while a burst arrived (30 ms a start among
#: 200 000 rows instead of 0.1 ms). Prepared again, a statement is planned on the table's size then.
REPLAN_SECONDS = 2.0

#: SQLSTATEs after which a statement is prepared again and run once more: it no longer exists on the
#: connection (a pooler reset the session), or a schema change altered its result.
_PREPARE_AGAIN = {"26000", "0A000"}

#: libpq's statuses of a statement that succeeded (TUPLES_OK, COMMAND_OK; psycopg's ExecStatus values)
_OK = frozenset({2, 1})


def _ok(result: Any) -> bool:
    return result.status in _OK


def _rows(held: _Held, result: Any) -> list[tuple[Any, ...]]:
    """A result's rows, loaded by the connection's own loaders (the values a cursor would return)."""
    loader = held.loader
    loader.set_pgresult(result)
    return list(loader.load_rows(0, result.ntuples, tuple))


def _forget(held: _Held, name: bytes) -> None:
    """Drop a prepared statement from a connection (if it is still there), to prepare it again."""
    import psycopg

    held.prepared.discard(name)
    with contextlib.suppress(psycopg.Error):
        held.cursor.connection.pgconn.exec_(b"DEALLOCATE " + name)


def _sqlstate(result: Any) -> str | None:
    from psycopg import pq

    state = result.error_field(pq.DiagnosticField.SQLSTATE)
    return None if state is None else str(state.decode())


def _pipelined(pgconn: Any, name: bytes, each: Sequence[Sequence[bytes | None]], setup: bytes = b"") -> list[Any]:
    """Send one prepared statement per set of values and a single sync, then read every result."""
    _send_pipeline(pgconn, name, each, setup)
    return read_pipeline(pgconn, bool(setup))


def _send_pipeline(pgconn: Any, name: bytes, each: Sequence[Sequence[bytes | None]], setup: bytes = b"") -> None:
    """Send one prepared statement per set of values and a single sync (one implicit transaction), unread;
    ``setup`` first, if given: a statement without parameters for that transaction (a ``set_config(..., true)``)."""
    from psycopg import pq

    pgconn.enter_pipeline_mode()
    try:
        if setup:
            pgconn.send_query_params(setup, None)
        for values in each:
            pgconn.send_query_prepared(name, values)
        pgconn.pipeline_sync()
    except BaseException:
        if pgconn.status == pq.ConnStatus.OK:
            with contextlib.suppress(Exception):
                pgconn.exit_pipeline_mode()
        raise


def read_pipeline(pgconn: Any, setup: bool = False) -> list[Any]:
    """Read the results of a pipeline (:func:`_send_pipeline`, pending.py's), up to its sync; leave pipeline mode
    (``setup``: it was sent with one, whose result is left out).

    libpq's ``PQgetResult`` would wait holding the GIL: the socket is polled here instead,
    so other threads of the process run while the database works. The first failed
    result is kept in place of the aborted ones after it.
    """
    from psycopg import pq

    try:
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN)
        results: list[Any] = []
        while True:
            while pgconn.is_busy():
                poller.poll()
                pgconn.consume_input()
            result = pgconn.get_result()
            if result is None:  # the end of one statement's results
                continue
            if result.status == pq.ExecStatus.PIPELINE_SYNC:
                break
            results.append(result)
    finally:
        if pgconn.status == pq.ConnStatus.OK:
            pgconn.exit_pipeline_mode()
    failed = next((r for r in results if r.status == pq.ExecStatus.FATAL_ERROR), None)
    return results[setup:] if failed is None else [failed]


class InFlight:
    """Statements sent in one pipeline and not read yet (:meth:`_HotPath.send_each`).

    Its connection serves nothing else until it is read: :meth:`wait` reads it (on any
    thread, once), and so does the next use of the connection on its own thread.
    """

    def __init__(
        self, hot: _HotPath, held: _Held, relaxed: bool, statement: Prepared, each: list[Any], setup: bytes
    ) -> None:
        self._hot, self._held, self._relaxed = hot, held, relaxed
        self._statement, self._each, self._setup = statement, each, setup
        self._lock = threading.Lock()
        self._rows: list[list[tuple[Any, ...]]] | None = None
        self._error: BaseException | None = None

    def wait(self) -> list[list[tuple[Any, ...]]]:
        """Each statement's rows (reading them if needed)."""
        with self._lock:
            if self._rows is None and self._error is None:
                self._read()
        if self._error is not None:
            raise self._error
        assert self._rows is not None
        return self._rows

    def _read(self) -> None:
        import psycopg

        held = self._held
        try:
            try:
                results = read_pipeline(held.cursor.connection.pgconn, bool(self._setup))
            finally:  # only now may the connection serve again: until then its thread waits for this read
                held.inflight = None
            failed = next((r for r in results if not _ok(r)), None)
            if failed is not None and _sqlstate(failed) in _PREPARE_AGAIN:
                _forget(held, self._statement.name)  # the statement went: sent again, and waited for, here
                self._rows = self._hot._send(self._relaxed, self._statement, self._each, True, setup=self._setup)
                return
            if failed is not None:
                self._hot._check(held, failed)
            self._rows = [_rows(held, r) for r in results]
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._hot._drop(held.cursor.connection)
            self._error = StoreUnavailable(f"outbox database unavailable: {exc}")
        except BaseException as exc:
            self._error = exc


#: Connections a forked child inherited from its parent's hot path: kept referenced, never
#: closed or collected, because closing one would end the parent's session on the shared socket.
_INHERITED: list[Any] = []


class _HotPath:
    """The executor's and the relay's per-command statements on PostgreSQL, run on psycopg directly.

    ``start`` and ``complete`` run once per command on every worker. Through SQLAlchemy
    each costs a few hundred microseconds of worker CPU beyond the round trip (pool
    checkout and reset, events, execution context, result metadata); through a psycopg
    cursor still about a hundred. :meth:`run` sends a :class:`Prepared` statement through
    libpq itself (one call that waits with the GIL released) and loads the rows with the
    connection's own loaders: the same values a cursor returns, for a third of the CPU.

    Each thread has its own connections (one per durability), made by the engine on
    first use (so its ``connect_args`` and ``connect`` events apply), then detached from
    its pool; replaced after a connection error. A forked child starts with none.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._conns: dict[tuple[int | str, bool], _Held] = {}  # (thread or lane, relaxed) -> its connection
        self._pid = current_pid()

    def compile(self, engine: sa.Engine, stmt: sa.Update) -> tuple[str, dict[str, Any]]:
        """The statement's SQL for a psycopg cursor and the values of its constant parameters."""
        compiled = stmt.compile(dialect=engine.dialect)
        return compiled.string, {k: v for k, v in compiled.params.items() if not k.startswith("p_")}

    def run(
        self, relaxed: bool, statement: Prepared, values: Sequence[bytes | None], lane: str | None = None
    ) -> list[tuple[Any, ...]]:
        """Run a prepared statement in autocommit on this thread's connection (or ``lane``'s); its rows."""
        held = self._held(relaxed, lane)
        if statement.name in held.prepared:  # the common case, straight through (a worker runs it per command)
            import psycopg

            try:
                result = held.cursor.connection.pgconn.exec_prepared(statement.name, values)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._drop(held.cursor.connection)
                raise StoreUnavailable(f"outbox database unavailable: {exc}") from exc
            if result.status in _OK:
                return _rows(held, result)
            if _sqlstate(result) not in _PREPARE_AGAIN:
                self._check(held, result)
            _forget(held, statement.name)  # gone from the session, or stale: prepared again below
        return self._send(relaxed, statement, [values], False, lane)[0]

    def run_each(
        self, relaxed: bool, statement: Prepared, each: Sequence[Sequence[bytes | None]], lane: str | None = None
    ) -> list[tuple[Any, ...] | None]:
        """A prepared statement once per set of values in ONE transaction and round trip; each one's first row."""
        return [rows[0] if rows else None for rows in self._send(relaxed, statement, each, True, lane)]

    def run_after(
        self, relaxed: bool, setup: bytes, statement: Prepared, values: Sequence[bytes | None], lane: str | None = None
    ) -> list[tuple[Any, ...]]:
        """``setup`` (a ``set_config``), then a prepared statement: ONE transaction and round trip; its rows."""
        return self._send(relaxed, statement, [values], True, lane, setup)[0]

    def send_each(
        self, relaxed: bool, statement: Prepared, each: Sequence[Sequence[bytes | None]], setup: bytes = b""
    ) -> InFlight:
        """A prepared statement once per set of values, in ONE transaction (after ``setup``, if given), sent in one
        libpq pipeline without waiting: the caller goes on; :meth:`InFlight.wait` returns each statement's rows."""
        import psycopg

        held = self._held(relaxed)
        pgconn = held.cursor.connection.pgconn
        try:
            if statement.name not in held.prepared:
                self._check(held, pgconn.prepare(statement.name, statement.sql, statement.types))
                held.prepared.add(statement.name)
            _send_pipeline(pgconn, statement.name, each, setup)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop(held.cursor.connection)
            raise StoreUnavailable(f"outbox database unavailable: {exc}") from exc
        held.inflight = InFlight(self, held, relaxed, statement, list(each), setup)
        return held.inflight

    def _send(
        self,
        relaxed: bool,
        statement: Prepared,
        each: Sequence[Sequence[bytes | None]],
        pipeline: bool,
        lane: str | None = None,
        setup: bytes = b"",
    ) -> list[list[tuple[Any, ...]]]:
        import psycopg

        held = self._held(relaxed, lane)
        pgconn = held.cursor.connection.pgconn
        try:
            for again in (True, False):
                if statement.name not in held.prepared:
                    self._check(held, pgconn.prepare(statement.name, statement.sql, statement.types))
                    held.prepared.add(statement.name)
                if pipeline:
                    results = _pipelined(pgconn, statement.name, each, setup)
                else:  # libpq waits with the GIL released
                    results = [pgconn.exec_prepared(statement.name, each[0])]
                failed = next((r for r in results if not _ok(r)), None)
                if failed is None:
                    break
                if not again or _sqlstate(failed) not in _PREPARE_AGAIN:
                    self._check(held, failed)
                _forget(held, statement.name)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop(held.cursor.connection)
            raise StoreUnavailable(f"outbox database unavailable: {exc}") from exc
        return [_rows(held, result) for result in results]

    def _check(self, held: _Held, result: Any) -> None:
        """Raise the error a failed libpq call reported (a lost connection as :class:`StoreUnavailable`)."""
        import psycopg
        from psycopg import pq

        if _ok(result):
            return
        conn = held.cursor.connection
        error = psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
        if (
            isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError))
            or conn.pgconn.status != pq.ConnStatus.OK
        ):
            self._drop(conn)
            raise StoreUnavailable(f"outbox database unavailable: {error}") from error
        raise error

    def execute_all(self, relaxed: bool, sql: str, params: dict[str, Any]) -> list[Any]:
        """Run one statement (a claim: once per batch) through this thread's cursor, in autocommit; all its rows."""
        import psycopg

        cursor = self._held(relaxed).cursor
        try:
            # Planned at each run: a generic plan cannot use the partial index of due rows (the statuses are
            # parameters), and PostgreSQL kept one, a scan of the whole table, when it first saw the table small.
            cursor.execute(sql, params, prepare=False)
            return list(cursor.fetchall())
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._drop(cursor.connection)
            raise StoreUnavailable(f"outbox database unavailable: {exc}") from exc

    def _held(self, relaxed: bool, lane: str | None = None) -> _Held:
        """This thread's connection for ``relaxed`` (kept: a new one per statement costs), or the process's
        connection of ``lane``: one for every thread, whose callers take turns (a caller that serializes them,
        such as the grouped starts, sends at most one call at a time)."""
        if current_pid() != self._pid:
            self._forget_inherited()
        key: tuple[int | str, bool] = (threading.get_ident() if lane is None else lane, relaxed)
        held = self._conns.get(key)
        if held is not None and held.inflight is not None:  # statements sent earlier: read before it serves again
            with contextlib.suppress(Exception):  # their sender learns of a failure from its own wait()
                held.inflight.wait()
            held = self._conns.get(key)
        fresh = held is not None and held.replan_at > time.monotonic()
        if held is not None and not held.cursor.connection.closed and (fresh or self._replan(held)):
            return held  # a connection lost while it was prepared again falls through to a new one
        import psycopg
        from psycopg.adapt import Transformer

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
        held = _Held(pooled, conn.cursor(), Transformer.from_context(conn))
        with self._lock:
            self._close_dead_threads()
            self._conns[key] = held
        return held

    def _replan(self, held: _Held) -> bool:
        """Forget the statements prepared on ``held``, prepared again at their next run (see ``REPLAN_SECONDS``);
        False if the connection was lost meanwhile (it is dropped: the caller gets a new one)."""
        from psycopg import pq

        held.replan_at = time.monotonic() + REPLAN_SECONDS
        for name in sorted(held.prepared):
            _forget(held, name)
        if held.cursor.connection.pgconn.status == pq.ConnStatus.OK:
            return True
        self._drop(held.cursor.connection)
        return False

    def _drop(self, conn: Any) -> None:
        """Forget and close a connection that failed (whichever thread noticed)."""
        with self._lock:
            keys = [k for k, v in self._conns.items() if v.cursor.connection is conn]
            held = self._conns.pop(keys[0]) if keys else None
        with contextlib.suppress(Exception):  # closed without the pool's reset: its rollback fails mid-pipeline
            conn.close()
            if held is not None:
                held.pooled.invalidate()

    def _close_dead_threads(self) -> None:
        alive = {t.ident for t in threading.enumerate()}
        for key in [k for k in self._conns if isinstance(k[0], int) and k[0] not in alive]:
            with contextlib.suppress(Exception):
                self._conns.pop(key).pooled.close()

    def _forget_inherited(self) -> None:
        with self._lock:
            _INHERITED.extend(self._conns.values())
            self._conns.clear()
            self._pid = current_pid()

    def close(self) -> None:
        """Close every connection this process made."""
        if current_pid() != self._pid:
            self._forget_inherited()
            return
        with self._lock:
            held, self._conns = list(self._conns.values()), {}
        for one in held:
            with contextlib.suppress(Exception):
                one.pooled.close()
