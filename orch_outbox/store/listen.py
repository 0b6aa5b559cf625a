"""LISTEN for pushes: the relay wakes when a pushing transaction commits."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from ..errors import OutboxError, StoreUnavailable
from ..schema import (
    notify_channel,
)
from .base import (
    StoreBase,
)


class ListenStatements(StoreBase):
    """LISTEN for pushes: the relay wakes when a pushing transaction commits."""

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
