"""Shared fixtures.

Isolation: every test gets its own outbox table prefix, so tests never see each other's
rows and can run against one PostgreSQL database. Servers are the local ones on
loopback; a test that needs one and cannot reach it fails (it is not skipped) when
``CI`` is set, so a broken CI machine is not mistaken for a green run.
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import start_worker

from orch_outbox import Outbox
from orch_outbox.default import base_config
from orch_outbox.store import make_engine

PG_URL = os.environ.get("ORCH_OUTBOX_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ORCH_OUTBOX_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
AMQP_URL = os.environ.get("ORCH_OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

_prefixes = itertools.count()


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require(host: str, port: int, what: str) -> None:
    if port_open(host, port):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not answering on {host}:{port}")
    pytest.skip(f"{what} is not answering on {host}:{port}")


def unique_prefix() -> str:
    return f"t{os.getpid() % 10000}_{next(_prefixes)}_"


@pytest.fixture(scope="session")
def pg_engine() -> Iterator[sa.Engine]:
    require("127.0.0.1", 5432, "PostgreSQL")
    engine = make_engine(PG_URL, pool_size=10, max_overflow=20)
    yield engine
    engine.dispose()


def make_app(broker: str = "memory://", name: str | None = None) -> Celery:
    app = Celery(name or f"test-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.config_from_object(base_config())
    app.conf.broker_url = broker
    app.conf.broker_connection_retry_on_startup = False
    return app


@pytest.fixture
def celery_app() -> Celery:
    """A fresh Celery app on kombu's in-memory broker."""
    return make_app()


@pytest.fixture
def pg_outbox(pg_engine: sa.Engine, celery_app: Celery) -> Iterator[Outbox]:
    """An outbox on PostgreSQL with a table of its own, dropped afterwards."""
    outbox = Outbox(
        celery_app,
        pg_engine,
        table_prefix=unique_prefix(),
        lock_buffer=2.0,
        retry_backoff="fixed",
        retry_backoff_base=0.0,
    )
    outbox.create_tables()
    yield outbox
    outbox.store.drop_all()
    outbox.close()


@pytest.fixture
def sqlite_outbox(tmp_path: object, celery_app: Celery) -> Iterator[Outbox]:
    """An outbox on a SQLite file of its own."""
    outbox = Outbox(
        celery_app,
        f"sqlite:///{tmp_path}/outbox.sqlite3",
        lock_buffer=2.0,
        retry_backoff="fixed",
        retry_backoff_base=0.0,
    )
    outbox.create_tables()
    yield outbox
    outbox.close()
    outbox.engine.dispose()


@pytest.fixture(params=["sqlite", "pg"])
def outbox(request: pytest.FixtureRequest) -> Outbox:
    """The same test on SQLite and on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_outbox")  # type: ignore[no-any-return]


def run_worker(app: Celery, queues: list[str], pool: str = "solo", concurrency: int = 1):  # type: ignore[no-untyped-def]
    """An in-process Celery worker consuming ``queues``."""
    return start_worker(
        app,
        pool=pool,
        concurrency=concurrency,
        queues=queues,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=10,
    )


@pytest.fixture(autouse=True)
def _close_outboxes() -> Iterator[None]:
    """Every Outbox a test made gives back its own connections afterwards (the server allows 100)."""
    from orch_outbox import registry as outbox_module

    before = set(map(id, outbox_module._BY_APP.values()))
    yield
    for made in list(outbox_module._BY_APP.values()):
        if id(made) not in before:
            made.close()
