"""LISTEN for pushes: the relay wakes when a pushing transaction commits."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import sqlalchemy as sa

from ..errors import OutboxError, StoreUnavailable
from ..schema import listeners_table, notify_channel
from .base import StoreBase, _dialect_insert


class ListenStatements(StoreBase):
    """LISTEN for pushes: the relay wakes when a pushing transaction commits."""

    @functools.cached_property
    def listeners(self) -> sa.Table:
        return listeners_table(self.prefix)

    def mark_idle(self, name: str, seconds: float) -> None:
        """This relay waits for a NOTIFY for up to ``seconds``: pushes notify until then (or until it is busy)."""
        t = self.listeners
        with self._one(relaxed=True) as conn:
            stmt = _dialect_insert(conn)(t).values(name=name, idle_until=self._later(seconds))
            conn.execute(
                stmt.on_conflict_do_update(index_elements=[t.c.name], set_={"idle_until": stmt.excluded.idle_until})
            )

    def mark_busy(self, name: str) -> None:
        """This relay is relaying (and will look again on its own): pushes need not notify it."""
        t = self.listeners
        with self._one(relaxed=True) as conn:
            conn.execute(sa.update(t).where(t.c.name == name).values(idle_until=None))

    def wake_listeners(self) -> None:
        """Notify the relays listening on this outbox's channel (one stopping wakes itself so)."""
        with self._one() as conn:
            conn.execute(sa.select(sa.func.pg_notify(notify_channel(self.prefix), "")))

    def forget_listener(self, name: str) -> None:
        """This relay stops: its row goes."""
        t = self.listeners
        with self._one(relaxed=True) as conn:
            conn.execute(sa.delete(t).where(t.c.name == name))

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

        # The dialect's own translation of the URL: multi-host URLs (``?host=a:1&host=b:2`` with
        # ``target_session_attrs=read-write``) become libpq's ``host=a,b port=1,2``.
        _, args = self.engine.dialect.create_connect_args(self.engine.url)
        args.pop("context", None)
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
