"""The outbox of a Django project: settings from Django's (through Celery's), its database Django's, pushes on it.

The project's ``proj/celery.py``, as in Celery's Django guide, plus one line::

    app = Celery("proj")
    app.config_from_object("django.conf:settings", namespace="CELERY")
    outbox = DjangoOutbox(app)

Celery reads ``CELERY_*`` settings as its own keys, so ``CELERY_OUTBOX_TABLE_PREFIX`` is the
outbox's ``outbox_table_prefix`` (library mode reads ``outbox_*`` from the app's config). The
database is ``CELERY_OUTBOX_DATABASE_URL`` when set, else Django's ``DATABASES[using]``. A push
given no connection (``cmd.push(order.id)``) writes on Django's connection of that alias, in
its transaction; ``cmd.push(connections["other"], ...)`` on another one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import sqlalchemy as sa
from celery import Celery

from ...clock import Clock
from ...errors import ConfigurationError
from ...outbox import Outbox
from ...registry import outbox_of
from ...settings import Settings
from .connection import django_connection

DEFAULT_ALIAS = "default"  # django.db.DEFAULT_DB_ALIAS, without importing Django's settings here

#: libpq connection parameters of a database's ``OPTIONS`` that its URL carries too.
LIBPQ_OPTIONS = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "connect_timeout",
    "options",
    "target_session_attrs",
    "service",
    "passfile",
)

_first: list[Outbox] = []


class DjangoOutbox(Outbox):
    """An outbox for a Django project; pushes given no connection write on Django's connection ``using``.

    :param app: the project's Celery app, configured from Django's settings.
    :param engine: the outbox's own engine or URL; by default ``CELERY_OUTBOX_DATABASE_URL``, else the
        database of ``DATABASES[using]`` (psycopg 3).
    :param using: the alias of Django's database the outbox lives in.
    """

    def __init__(
        self,
        app: Celery,
        engine: sa.Engine | str | None = None,
        *,
        using: str = DEFAULT_ALIAS,
        clock: Clock | None = None,
        **settings: Any,
    ) -> None:
        self.using = using
        super().__init__(app, engine, clock=clock, **settings)
        self.connections.adapters.append(django_connection)
        self.connections.current = self.current_connection
        if not _first:
            _first.append(self)

    def current_connection(self) -> Any:
        """Django's connection of this outbox's alias, in this thread (``django.db.connections[using]``)."""
        from django.db import connections

        return connections[self.using]

    @functools.cached_property
    def settings(self) -> Settings:
        """The outbox's settings; without a database URL of its own, the one of Django's ``DATABASES[using]``."""
        settings = Settings.from_sources(self.app.conf, **self._overrides)
        if settings.database_url or self._engine_arg is not None:
            return settings
        return dataclasses.replace(settings, database_url=database_url(self.using))


def database_url(alias: str = DEFAULT_ALIAS) -> str:
    """The SQLAlchemy URL (psycopg 3) of the database Django's ``DATABASES[alias]`` names."""
    from django.conf import settings

    try:
        database = settings.DATABASES[alias]
    except KeyError:
        raise ConfigurationError(f"Django's DATABASES has no {alias!r}") from None
    return url_of(database, alias)


def url_of(database: dict[str, Any], alias: str = DEFAULT_ALIAS) -> str:
    """The SQLAlchemy URL (psycopg 3) of one entry of Django's ``DATABASES``: host, port, name, user, password,
    and the libpq options among its ``OPTIONS``."""
    engine = str(database.get("ENGINE", ""))
    if "postgresql" not in engine and "postgis" not in engine:
        raise ConfigurationError(
            f"Django's database {alias!r} is {engine or 'not set'}: the outbox derives its URL from a PostgreSQL "
            "one only; set CELERY_OUTBOX_DATABASE_URL"
        )
    options = database.get("OPTIONS") or {}
    query = {key: str(options[key]) for key in LIBPQ_OPTIONS if options.get(key) not in (None, "")}
    host = str(database.get("HOST") or "") or None
    if host is not None and host.startswith("/"):  # a Unix socket directory: libpq's host parameter
        query["host"], host = host, None
    port = database.get("PORT")
    url = sa.URL.create(
        "postgresql+psycopg",
        username=database.get("USER") or None,
        password=database.get("PASSWORD") or None,
        host=host,
        port=int(port) if port not in (None, "") else None,
        database=database.get("NAME") or None,
        query=query,
    )
    return url.render_as_string(hide_password=False)


def find_outbox(path: str | None = None) -> Outbox:
    """The project's outbox: ``path`` (``module:attribute``) if given, else the first :class:`DjangoOutbox`
    made in this process (``proj/celery.py``'s, imported by ``proj/__init__.py``), else the outbox of Celery's
    current app."""
    if path:
        from celery.utils.imports import symbol_by_name

        found = symbol_by_name(path)
        if not isinstance(found, Outbox):
            raise ConfigurationError(f"{path} is a {type(found).__name__}, not an Outbox")
        return found
    if _first:
        return _first[0]
    from celery import current_app

    try:
        return outbox_of(current_app._get_current_object())
    except ConfigurationError:
        raise ConfigurationError(
            "no outbox in this Django project: create it in proj/celery.py (outbox = DjangoOutbox(app)) and import "
            "that module in proj/__init__.py, as Celery's Django guide does with the app"
        ) from None


__all__ = ["DjangoOutbox", "database_url", "find_outbox", "url_of"]
