"""Pushing on Django's own database connection, inside its ``transaction.atomic()``.

:func:`django_connection` is a connection adapter (see ``orch_outbox/connections.py``): given a
Django connection (``django.db.connections[alias]``) it lends that connection's DB-API
connection, for one push, to a SQLAlchemy Connection, so the outbox's INSERT runs on Django's
connection, in whatever transaction Django has open there:

- inside ``atomic()`` it is part of Django's transaction: Django's rollback drops it, its
  commit keeps it;
- outside (Django's autocommit) the push is a transaction of its own that Django opens and
  commits (``atomic()`` around the push), as an ORM ``save()`` is.

Django owns the connection, and SQLAlchemy never ends anything on it. The SQLAlchemy engine
(one per alias) gets the connection through ``creator=`` as an :class:`Unowned` proxy, whose
``commit``, ``rollback`` and ``close`` do nothing and which refuses to have attributes set
(autocommit, isolation level); everything else goes to the real connection. The pool is a
``NullPool`` that resets nothing on return. The dialects are SQLAlchemy's psycopg (3) and
psycopg2 ones with two changes, for a connection Django has configured:

- no ``on_connect`` hook: psycopg's adds a notice handler to the connection (one more at
  every push, on a connection that lives on), psycopg2's registers the UUID type on it;
- ``jsonb`` is parsed from text: Django's connection loads it as text (its JSONField parses
  it), where SQLAlchemy would expect the driver to have parsed it already.

Inside ``atomic()``, a push whose statement failed leaves the transaction failed, as a failed
ORM query does: the adapter marks the ``atomic()`` block for rollback (``needs_rollback``), and
Django refuses the block's next queries until it is rolled back.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.pool import NullPool

from ...errors import ConfigurationError

#: libpq's PQTRANS_INERROR (psycopg's TransactionStatus.INERROR, psycopg2's TRANSACTION_STATUS_INERROR).
_INERROR = 3

#: The DB-API connection being lent, read by the engine's ``creator`` while ``engine.connect()`` runs.
_LENT: ContextVar[Any] = ContextVar("orch_outbox_django_lent")


class Unowned:
    """Django's DB-API connection as SQLAlchemy gets it: commit, rollback and close do nothing (Django owns them).

    Every other attribute is the real connection's; setting one is refused, so SQLAlchemy
    cannot change the connection's autocommit or isolation level under Django.
    """

    __slots__ = ("_raw",)

    def __init__(self, raw: Any) -> None:
        object.__setattr__(self, "_raw", raw)

    def commit(self) -> None:
        """Nothing: Django commits (at the end of the outermost ``atomic()``)."""

    def rollback(self) -> None:
        """Nothing: Django rolls back (``atomic()`` left by an exception)."""

    def close(self) -> None:
        """Nothing: Django closes its connection (``CONN_MAX_AGE``, the end of a request)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_raw"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"orch_outbox never changes Django's connection (SQLAlchemy tried to set {name!r})")


def _load_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def _text_jsonb(base: type) -> type:
    """A dialect's jsonb type that parses the text Django's connection loads jsonb as."""

    def result_processor(self: Any, dialect: Any, coltype: Any) -> Any:
        return _load_json

    return type(f"Django{base.__name__}", (base,), {"result_processor": result_processor})


class DjangoPsycopgDialect(PGDialect_psycopg):
    """SQLAlchemy's psycopg (3) dialect on a connection Django opened and configured."""

    supports_statement_cache = True
    colspecs = {**PGDialect_psycopg.colspecs, JSONB: _text_jsonb(PGDialect_psycopg.colspecs[JSONB])}

    def on_connect(self) -> None:
        return None


class DjangoPsycopg2Dialect(PGDialect_psycopg2):
    """SQLAlchemy's psycopg2 dialect on a connection Django opened and configured."""

    supports_statement_cache = True
    colspecs = {**PGDialect_psycopg2.colspecs, JSONB: _text_jsonb(PGDialect_psycopg2.colspecs[JSONB])}

    def on_connect(self) -> None:
        return None


DIALECTS = {"psycopg": "orch_django_psycopg", "psycopg2": "orch_django_psycopg2"}
registry.register("postgresql.orch_django_psycopg", __name__, "DjangoPsycopgDialect")
registry.register("postgresql.orch_django_psycopg2", __name__, "DjangoPsycopg2Dialect")

_engines: dict[tuple[str, str], sa.Engine] = {}
_lock = threading.Lock()


def _lent() -> Unowned:
    return Unowned(_LENT.get())


def engine_for(alias: str, driver: str) -> sa.Engine:
    """The SQLAlchemy engine that lends Django's connections of ``alias`` (one per alias and driver)."""
    with _lock:
        engine = _engines.get((alias, driver))
        if engine is None:
            engine = sa.create_engine(
                f"postgresql+{DIALECTS[driver]}://",
                creator=_lent,
                poolclass=NullPool,
                pool_reset_on_return=None,
                use_native_hstore=False,
            )
            _engines[(alias, driver)] = engine
        return engine


def driver_of(wrapper: Any) -> str:
    """``psycopg`` or ``psycopg2``: the driver Django's PostgreSQL backend uses (it prefers psycopg 3)."""
    driver = str(wrapper.Database.__name__).split(".")[0]
    if driver not in DIALECTS:  # pragma: no cover - Django's PostgreSQL backend knows no other
        raise ConfigurationError(f"Django's database {wrapper.alias!r} uses the driver {driver!r}: not supported")
    return driver


def django_connection(obj: Any) -> contextlib.AbstractContextManager[sa.Connection] | None:
    """The connection adapter for Django: a Django connection as a SQLAlchemy Connection for one push, else None."""
    from django.db.backends.base.base import BaseDatabaseWrapper

    if not isinstance(obj, BaseDatabaseWrapper):
        return None
    if obj.vendor != "postgresql":
        raise ConfigurationError(
            f"the outbox pushes on Django's PostgreSQL connections; the database {obj.alias!r} is {obj.vendor}"
        )
    return _lend(obj)


@contextlib.contextmanager
def _lend(wrapper: Any) -> Iterator[sa.Connection]:
    from django.db import transaction

    wrapper.ensure_connection()
    wrapper.validate_thread_sharing()
    raw = wrapper.connection
    token = _LENT.set(raw)
    try:
        conn = engine_for(wrapper.alias, driver_of(wrapper)).connect()
    finally:
        _LENT.reset(token)
    outer = wrapper.in_atomic_block
    # Outside atomic(): Django opens the push's transaction and commits it, as it does for an ORM save.
    with conn, contextlib.nullcontext() if outer else transaction.atomic(using=wrapper.alias):
        try:
            yield conn
        except BaseException:
            if outer and raw.info.transaction_status == _INERROR:
                wrapper.needs_rollback = True  # the transaction failed: Django refuses the block's next queries
            raise


__all__ = ["DjangoPsycopg2Dialect", "DjangoPsycopgDialect", "Unowned", "django_connection", "engine_for"]
