"""The example Django project (examples/django) in the test process, on a scratch PostgreSQL database of its own.

Django is set up once per process, so the project is too: :func:`open_site` creates a scratch
database (``django_<pid>_<hex>``), points the project at it and at a RabbitMQ queue of its own
(through the environment its settings read, restored afterwards), runs Django's and the
outbox's migrations in it, and returns the :class:`Site`. The ``django_site`` fixture (session
scope; every module that imports it shares the one site) drops the database and deletes the
queue when the last user is done.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from .broker import delete_queue
from conftest import AMQP_URL, PG_URL, require

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django"
#: The operator's page the project's admin page links to (nothing serves it: the link is what is tested).
WEB_URL = "http://127.0.0.1:9/outbox"


def create_database(prefix: str) -> str:
    """A new PostgreSQL database named ``<prefix>_<hex>``; its name."""
    require("127.0.0.1", 5432, "PostgreSQL")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return name


def drop_database(name: str) -> None:
    """DROP DATABASE, with whatever sessions are still connected to it."""
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def url_of(name: str) -> str:
    """The SQLAlchemy URL of a database of the local server."""
    return sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def project_env(database: str, queue: str) -> dict[str, str]:
    """The environment the example project reads (proj/settings.py, shop/tasks.py) for this database and queue."""
    pg = sa.make_url(PG_URL)
    return {
        "DJANGO_SETTINGS_MODULE": "proj.settings",
        "SHOP_DB_NAME": database,
        "SHOP_DB_HOST": pg.host or "127.0.0.1",
        "SHOP_DB_PORT": str(pg.port or 5432),
        "SHOP_DB_USER": pg.username or "postgres",
        "SHOP_DB_PASSWORD": pg.password or "",
        "BROKER_URL": AMQP_URL,
        "ORDERS_QUEUE": queue,
        "OUTBOX_WEB_URL": WEB_URL,
    }


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Site:
    """The example project set up in this process."""

    database: str
    queue: str
    #: what the project's modules are: proj.celery's outbox, shop.models.Order, shop.views, shop.tasks
    outbox: Any
    order: Any
    views: Any
    tasks: Any

    @property
    def url(self) -> str:
        return url_of(self.database)

    def env(self) -> dict[str, str]:
        """The environment of a process of the project (``manage.py``, ``celery -A proj``) on this site."""
        return {**project_env(self.database, self.queue), "PYTHONPATH": str(EXAMPLE)}


_site: list[Site] = []
_users = [0]


def open_site() -> Site:
    """The example project set up in this process on its scratch database (made and migrated on first use)."""
    _users[0] += 1
    if _site:
        return _site[0]
    import django
    from celery import current_app
    from django.conf import settings
    from django.core.management import call_command
    from django.test.utils import setup_test_environment

    if settings.configured:
        raise RuntimeError("Django was set up before the example project: the django_site fixture must set it up")
    database = create_database("django")
    queue = f"django-{uuid.uuid4().hex[:10]}"
    previous_app = current_app._get_current_object()
    for name in [m for m in sys.modules if m.split(".")[0] in ("proj", "shop")]:
        if not str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(EXAMPLE)):
            del sys.modules[name]  # another example's module of that name (examples/fastapi_sqlalchemy's shop)
    sys.path.insert(0, str(EXAMPLE))
    try:
        with environment(project_env(database, queue)):
            django.setup()
            setup_test_environment()  # the test client's "testserver" host is allowed
            import proj
            import shop.models
            import shop.tasks
            import shop.views

            call_command("migrate", verbosity=0)
            call_command("outbox_migrate", verbosity=0)
    except BaseException:
        drop_database(database)
        raise
    finally:
        previous_app.set_current()  # proj.celery's app made itself Celery's current app
    _site.append(Site(database, queue, proj.outbox, shop.models.Order, shop.views, shop.tasks))
    return _site[0]


def release_site() -> None:
    """One user less; the last one drops the database and deletes the queue."""
    _users[0] -= 1
    if _users[0] > 0 or not _site:
        return
    from django.db import connections

    site = _site[0]
    connections.close_all()
    site.outbox.close()
    site.outbox.engine.dispose()
    drop_database(site.database)
    delete_queue(AMQP_URL, site.queue)


@pytest.fixture(scope="session")
def django_site() -> Iterator[Site]:
    """The example Django project set up in this process, on a scratch database and a queue of its own."""
    site = open_site()
    try:
        yield site
    finally:
        release_site()
