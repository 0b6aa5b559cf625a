"""Pushes held until their transaction's next statement, or until its commit, which then takes them along.

A push inside the caller's transaction costs the caller validation and encoding only; its
row is written with the transaction's next statement, or at its commit. At the commit of a
transaction on psycopg, the held rows, the ``COMMIT`` and (if the transaction has not
reached the database yet) its ``BEGIN`` go out in one libpq pipeline: one round trip
where the caller's own ``INSERT`` then ``COMMIT`` would take two or three. Each statement
runs in order in the caller's transaction, so nothing differs but the number of waits: the
rows and the caller's writes commit together or not at all, and an error of either is
raised by the commit.
"""

from __future__ import annotations

import contextlib
import select
import threading
import weakref
from collections.abc import Sequence
from typing import Any, NoReturn, Protocol

import sqlalchemy as sa
from sqlalchemy import event

from ..errors import StoreUnavailable
from .base import Row
from .hotpath import read_pipeline

#: One held row as it is sent: an INSERT with ``$n`` placeholders and its values as text.
Statement = tuple[bytes, Sequence[bytes | None]]


class HeldWriter(Protocol):
    """What writes held rows: the store that held them."""

    def write_held(self, conn: sa.Connection, rows: Sequence[Row]) -> None:
        """Write ``rows`` on the caller's connection now, in its transaction."""

    def held_statements(self, raw: Any, rows: Sequence[Row]) -> list[Statement] | None:
        """``rows`` as INSERT statements to pipeline with the commit, or None where they are written otherwise."""


def driver(conn: sa.Connection) -> Any:
    """The caller's psycopg connection, inside the caller's SQLAlchemy transaction.

    SQLAlchemy begins a Connection's transaction at its first statement ("commit as you
    go"). A statement sent to the driver directly does not count: the caller's
    ``conn.commit()`` would then commit nothing and closing the connection would roll the
    push back. So the transaction is begun first, as SQLAlchemy's own statement would.
    """
    if not conn.in_transaction():
        conn.begin()
    return conn.connection.driver_connection


def raise_driver_error(exc: Exception, statement: str) -> NoReturn:
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


class _PendingPushes:
    """Pushed rows written when their transaction runs its next statement, or with its commit.

    Pushes made between two statements share one round trip; they go before the next
    statement of any kind (so the transaction's own queries see the rows, in the order
    things were done), before a savepoint is set, released or rolled back to, and at
    commit with the ``COMMIT`` itself (see the module docstring). A rollback drops them
    with the rest of the transaction. Rows reach the database as they would have at push
    time: only the moment differs, and a database error (not bad input, which push
    refuses at once) is raised by that next statement or by the commit.

    One per process (``PENDING``), listening once to each engine that pushed: SQLAlchemy
    must see the transaction's statements, so SQL sent on the raw DBAPI connection
    (``conn.connection.cursor()``) after a push does not write it first.
    """

    _BEFORE = ("before_execute", "savepoint", "rollback_savepoint", "release_savepoint", "prepare_twophase")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: weakref.WeakKeyDictionary[sa.Connection, list[tuple[HeldWriter, list[Row]]]] = (
            weakref.WeakKeyDictionary()
        )
        self._engines: weakref.WeakSet[sa.Engine] = weakref.WeakSet()

    def add(self, conn: sa.Connection, rows: Sequence[Row], writer: HeldWriter) -> None:
        """Hold ``rows`` for the caller's transaction on ``conn`` (begun now if it was not); ``writer`` writes them."""
        self._listen(conn.engine)
        driver(conn)
        with self._lock:
            held = self._held.setdefault(conn, [])
            if held and held[-1][0] is writer:
                held[-1][1].extend(rows)
            else:
                held.append((writer, list(rows)))

    def flush(self, conn: sa.Connection, *_: Any) -> None:
        """Write what ``conn``'s transaction holds, in push order (an event listener too: other arguments ignored)."""
        for writer, rows in self._take(conn):
            writer.write_held(conn, rows)

    def at_commit(self, conn: sa.Connection) -> None:
        """Right before ``conn``'s transaction commits: what it holds, and the commit, in one round trip if they can
        go so (else written now, and SQLAlchemy commits after)."""
        held = self._take(conn)
        if not held:
            return
        statements = self._with_commit(conn, held)
        if statements is None:
            for writer, rows in held:
                writer.write_held(conn, rows)
            return
        raw: Any = conn.connection.driver_connection
        try:
            failed = _commit_with(raw, statements)
        except Exception as exc:
            raise_driver_error(exc, "COMMIT")
        if failed is not None:
            import psycopg

            raise_driver_error(psycopg.errors.error_from_result(failed, encoding=raw.info.encoding), "COMMIT")

    def _take(self, conn: sa.Connection) -> list[tuple[HeldWriter, list[Row]]]:
        if not self._held:  # every statement of the app comes here: the usual case takes no lock
            return []
        with self._lock:
            return self._held.pop(conn, None) or []

    def _with_commit(self, conn: sa.Connection, held: list[tuple[HeldWriter, list[Row]]]) -> list[Statement] | None:
        """The statements to send with the commit, or None where the rows must be written first: a listener of
        the commit runs after this one (it must still see the transaction open), the connection is in autocommit,
        in a pipeline of its own or its transaction failed, or a writer writes otherwise (COPY)."""
        from psycopg import pq

        if list(conn.dispatch.commit)[-1] != self.at_commit:
            return None
        raw: Any = conn.connection.driver_connection
        pgconn = raw.pgconn
        ready = (pq.TransactionStatus.IDLE, pq.TransactionStatus.INTRANS)
        if raw.autocommit or pgconn.pipeline_status != pq.PipelineStatus.OFF or pgconn.transaction_status not in ready:
            return None
        statements: list[Statement] = []
        for writer, rows in held:
            some = writer.held_statements(raw, rows)
            if some is None:
                return None
            statements.extend(some)
        return statements

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
        event.listen(engine, "commit", self.at_commit)
        event.listen(engine, "rollback", self._drop)


PENDING = _PendingPushes()


def _commit_with(raw: Any, statements: Sequence[Statement]) -> Any:
    """On the caller's psycopg connection: its ``BEGIN`` if it has not reached the database yet, ``statements``
    and ``COMMIT`` in one pipeline. Returns the first failed result (None if none): after a failure the rest is
    skipped, and the transaction, if it was begun, waits in its failed state for the caller's rollback."""
    from psycopg import pq

    with raw.lock:
        pgconn = raw.pgconn
        begin = pgconn.transaction_status == pq.TransactionStatus.IDLE
        pgconn.enter_pipeline_mode()
        try:
            if begin:
                pgconn.send_query_params(_begin(raw), None)
            for sql, values in statements:
                pgconn.send_query_params(sql, values)
            pgconn.send_query_params(b"COMMIT", None)
            pgconn.pipeline_sync()
            while pgconn.flush():  # a nonblocking connection: large rows may not have gone out at once
                readable, _, _ = select.select([pgconn.socket], [pgconn.socket], [])
                if readable:  # read what the server sent meanwhile, so that neither side waits on a full buffer
                    pgconn.consume_input()
        except BaseException:
            if pgconn.status == pq.ConnStatus.OK:
                with contextlib.suppress(Exception):  # what was sent is not read: the caller's rollback ends it
                    pgconn.exit_pipeline_mode()
            raise
        results = read_pipeline(pgconn)
    return next((r for r in results if r.status == pq.ExecStatus.FATAL_ERROR), None)


def _begin(raw: Any) -> bytes:
    """The ``BEGIN`` psycopg would send for this connection's settings (isolation level, read only, deferrable)."""
    from psycopg import IsolationLevel

    parts = ["BEGIN"]
    if raw.isolation_level is not None:
        parts.append("ISOLATION LEVEL " + IsolationLevel(raw.isolation_level).name.replace("_", " "))
    if raw.read_only is not None:
        parts.append("READ ONLY" if raw.read_only else "READ WRITE")
    if raw.deferrable is not None:
        parts.append("DEFERRABLE" if raw.deferrable else "NOT DEFERRABLE")
    return " ".join(parts).encode()
