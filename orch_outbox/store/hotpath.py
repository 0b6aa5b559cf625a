"""The executor's and the relay's per-command statements on psycopg directly, as prepared statements."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

import sqlalchemy as sa

from ..errors import StoreUnavailable

#: A claimed row as the claim statement returns it (its RETURNING list is these fields).
_CLAIMED = collections.namedtuple(
    "_CLAIMED",
    "id name target attempt input timeout priority status batch_id expires_at retries retries_left trace tenant",
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
