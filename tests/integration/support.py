"""Helpers of the PostgreSQL integration tests (imported by tests and the conftest)."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker

from orch_outbox.default import base_config

_prefixes = itertools.count()


def integration_prefix() -> str:
    """A table prefix no other test (of any slice, in this process) uses."""
    return f"it{os.getpid() % 100000}_{next(_prefixes)}_"


def unique_target(what: str = "q") -> str:
    """A queue name of this test alone: the in-memory broker is shared by the whole process."""
    return f"{what}-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def target_queue(app: Any, what: str = "q") -> Iterator[str]:
    """A queue name of this test alone (:func:`unique_target`), its queue deleted on the app's broker afterwards."""
    name = unique_target(what)
    yield name
    with app.connection_for_write() as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(queue=name)


class FakeClock:
    """A clock that only moves when told to (thread-safe)."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime.now(dt.UTC)
        self._lock = threading.Lock()

    def __call__(self) -> dt.datetime:
        with self._lock:
            return self._now

    def set(self, when: dt.datetime) -> None:
        with self._lock:
            self._now = when

    def advance(self, seconds: float) -> dt.datetime:
        with self._lock:
            self._now += dt.timedelta(seconds=seconds)
            return self._now


def new_app() -> Celery:
    app = Celery(f"it-{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.config_from_object(base_config())
    app.conf.broker_url = "memory://"
    app.conf.broker_connection_retry_on_startup = False
    return app


def run_worker(app: Celery, queues: list[str], pool: str = "solo", concurrency: int = 1) -> Any:
    """An in-process solo-pool Celery worker consuming ``queues`` (as ``tests/conftest.run_worker``).

    The in-memory transport polls its queues once a second by default; polling faster
    keeps the end-to-end tests short (it changes nothing the tests check).
    """
    options = dict(app.conf.broker_transport_options or {})
    options.setdefault("polling_interval", 0.02)
    app.conf.broker_transport_options = options
    return start_worker(
        app,
        pool=pool,
        concurrency=concurrency,
        queues=queues,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=10,
    )
