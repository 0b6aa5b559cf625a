"""The files of the soak's project folder, as templates: ``celeryconfig.py`` and ``soak_commands.py``.

Imported by ``scripts/soak.py``, which fills them in (``string.Template``: ``$name`` is a ``repr``).
"""

from __future__ import annotations

import string

CELERYCONFIG = string.Template('''\
"""Celery configuration of the soak project (written by scripts/soak.py)."""

broker_url = $broker_url
outbox_database_url = $database_url
outbox_table_prefix = $prefix
# Short leases and fast retries, so that kills are noticed and settled quickly.
outbox_dispatch_timeout = $dispatch_timeout
outbox_lock_buffer = 2.0
outbox_rescue_interval = 1.0
outbox_poll_interval = 0.5
outbox_default_timeout = 5.0
outbox_default_retries = 3
outbox_retry_backoff = "exponential"
outbox_retry_backoff_base = 0.2
outbox_retry_backoff_max = 2.0
# A short broker queue to go with the short dispatch lease: 100 messages drain in about
# two seconds, so a message rarely waits in the broker past its lease and gets redispatched.
outbox_max_in_flight = 100
imports = ("soak_commands",)
beat_schedule_filename = $schedule
''')

COMMANDS = string.Template('''\
"""Commands of the soak project (written by scripts/soak.py).

Each handler INSERTs its execution into the effects ledger, in its own autocommitted
connection, before it returns or raises; the soak reconciles the outbox against it.
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa

from orch_outbox import command, current
from orch_outbox.task import Outcome

QUEUE = $queue
EFFECTS_URL = $effects_url
EFFECTS_TABLE = $effects_table
#: Of the commands pushed with fail=True, those with n divisible by this always fail.
ALWAYS_FAIL_EVERY = 4
#: The others fail on attempts up to this one, then succeed.
FAIL_UNTIL_ATTEMPT = 2

_engine: sa.Engine | None = None
_engine_pid = 0


def _effects_engine() -> sa.Engine:
    """A small pool per worker process (a prefork child never reuses its parent's connections)."""
    global _engine, _engine_pid
    if _engine is None or _engine_pid != os.getpid():
        _engine = sa.create_engine(EFFECTS_URL, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=2)
        _engine_pid = os.getpid()
    return _engine


def record(name: str) -> None:
    """The side effect: one ledger row per execution of an attempt."""
    ctx = current()
    with _effects_engine().connect() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {EFFECTS_TABLE} (command_id, attempt, name, pid) VALUES (:id, :attempt, :name, :pid)"
            ),
            {"id": ctx.id, "attempt": ctx.attempt, "name": name, "pid": os.getpid()},
        )


def raises(n: int, fail: bool, attempt: int) -> bool:
    """Whether work(n, fail) raises at this attempt, by design."""
    return fail and (n % ALWAYS_FAIL_EVERY == 0 or attempt <= FAIL_UNTIL_ATTEMPT)


@command(target=QUEUE)
def work(n: int, fail: bool) -> int:
    attempt = current().attempt
    record("work")
    if raises(n, fail, attempt):
        raise RuntimeError(f"work({n}) fails by design at attempt {attempt}")
    return n


@command(target=QUEUE)
def after_work(n: int) -> int:
    record("after_work")
    return n


@command(target=QUEUE)
def after_failure(n: int) -> int:
    record("after_failure")
    return n


@work.then
def _after_work(outcome: Outcome) -> list[Any]:
    return [after_work.s(outcome.input["n"])]


@work.if_failed
def _after_failure(outcome: Outcome) -> list[Any]:
    return [after_failure.s(outcome.input["n"])]
''')


def psycopg_url(url: str) -> str:
    """``postgresql://`` with the psycopg 3 driver named (what orch_outbox's make_engine does)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url
