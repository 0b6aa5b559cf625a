"""What a push writes on: a SQLAlchemy connection, one an adapter makes of another kind, or the current one.

A push takes a SQLAlchemy ``Session``, ``Connection`` or ``Engine``. A framework with database
connections of its own (Django's, see ``orch_outbox.contrib.django``) adds two things to an
outbox's :class:`Connections`, without this package knowing the framework:

- an **adapter** (``outbox.connections.adapters``): a callable given the object a push received;
  it returns a context manager yielding a ``sqlalchemy.Connection`` on that object's own
  transaction, or None when it does not recognise the object. Creating the context manager
  must do nothing yet: a push may ask an adapter only whether it recognises an object;
- a **current connection** (``outbox.connections.current``): a callable returning what a push
  writes on when it is given none, so ``cmd.push("ada")`` pushes on it and ``cmd.push(session,
  "ada")`` still on the session.

A connection an adapter lent ends with the push: the rows a push would hold until the
transaction's next statement (see ``store/push.py``) are written before it ends, so a push on
it is in the database (in the caller's transaction) when the push returns, and its errors are
raised by the push itself.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .store import PENDING

_T = TypeVar("_T")

#: Given what a push received: a context manager yielding a SQLAlchemy Connection on it, or None.
ConnectionAdapter = Callable[[Any], AbstractContextManager[sa.Connection] | None]

_SQLALCHEMY = (Session, sa.Connection, sa.Engine)


class Connections:
    """The connection adapters of one outbox, and what it pushes on when a push is given no connection."""

    def __init__(self) -> None:
        #: tried in order on anything that is not a SQLAlchemy Session, Connection or Engine
        self.adapters: list[ConnectionAdapter] = []
        #: what a push given no connection writes on (None: such a push is a TypeError)
        self.current: Callable[[], Any] | None = None

    def recognises(self, conn: Any) -> bool:
        """Whether a push can write on ``conn``: SQLAlchemy's own, or an object an adapter recognises."""
        return isinstance(conn, _SQLALCHEMY) or any(adapt(conn) is not None for adapt in self.adapters)

    def split(self, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        """(the connection, the command's arguments) of ``cmd.push(...)``'s positional arguments.

        A first argument a push can write on is the connection; otherwise, with a current
        connection, every argument is the command's (the connection is None: the current one).
        """
        if args and self.recognises(args[0]):
            return args[0], args[1:]
        if self.current is not None:
            return None, args
        raise TypeError(self._refusal(args[0] if args else None, given=bool(args)))

    def run(self, conn: Any, work: Callable[[sa.Connection], _T]) -> _T:
        """Run ``work`` on the SQLAlchemy Connection of ``conn`` (None: the current connection), in its transaction.

        An Engine gets a transaction of its own, committed when ``work`` returns; an adapter's
        connection holds nothing back once ``work`` returned (see the module's docstring).
        """
        if conn is None:
            if self.current is None:
                raise TypeError(self._refusal(None, given=False))
            conn = self.current()
        if isinstance(conn, Session):
            return work(conn.connection())
        if isinstance(conn, sa.Connection):
            return work(conn)
        if isinstance(conn, sa.Engine):
            with conn.begin() as own:
                return work(own)
        for adapt in self.adapters:
            opened = adapt(conn)
            if opened is not None:
                with opened as lent:
                    result = work(lent)
                    PENDING.flush(lent)  # the lent connection ends here: what the push held is written now
                    return result
        raise TypeError(self._refusal(conn, given=True))

    def _refusal(self, conn: Any, given: bool) -> str:
        what = type(conn).__name__ if given else "no connection"
        known = "a SQLAlchemy Session, Connection or Engine"
        if self.adapters:
            known += " (or a connection one of this outbox's connection adapters recognises)"
        return f"push needs {known}, not {what}; an outbox with a current connection (outbox.connections.current) " + (
            "takes none" if self.current is None else "pushes on it when given none"
        )


__all__ = ["ConnectionAdapter", "Connections"]
