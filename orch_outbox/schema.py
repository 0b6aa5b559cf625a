"""The outbox tables, as SQLAlchemy metadata (also Alembic's target metadata).

Eight tables per outbox: ``{prefix}commands`` (the outbox itself, commands and jobs),
``{prefix}batches`` (batches and chords, with their continuation), ``{prefix}schedules``
(cron schedules), ``{prefix}pauses`` (what the relay holds back), ``{prefix}limits`` (the
rate limits' buckets), ``{prefix}attempts`` (the attempt history), ``{prefix}listeners``
(relays waiting for a NOTIFY) and ``{prefix}workers`` (the worker registry: which worker
processes are alive, and what they may hold). The claim is served by a partial index over
pending rows in claim order; the lease rescuer by a partial index over leased rows. Users
with their own Alembic setup can include :func:`metadata_for` in their ``target_metadata``.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql

from .settings import validate_prefix
from .states import FINAL, UNFINISHED, AttemptOutcome, BatchStatus, Status

STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
FINAL_STATUSES: tuple[str, ...] = tuple(s.value for s in Status if s in FINAL)
UNFINISHED_STATUSES: tuple[str, ...] = tuple(s.value for s in Status if s in UNFINISHED)
OUTCOMES: tuple[str, ...] = tuple(o.value for o in AttemptOutcome)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp stored in UTC: ``timestamptz`` on PostgreSQL, UTC text on SQLite.

    Naive datetimes are refused: a naive time is ambiguous, and a guessed zone would move
    a due time by hours.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONDocument = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _partial(name: str, *columns: Any, where: sa.ColumnElement[bool], unique: bool = False) -> sa.Index:
    """An index over the rows ``where`` holds, on PostgreSQL and SQLite alike."""
    return sa.Index(name, *columns, unique=unique, postgresql_where=where, sqlite_where=where)


def unique_scope(commands: Any) -> sa.ColumnElement[bool]:
    """Where the unique-key index applies: keyed rows not yet final."""
    return sa.and_(commands.c.unique_key.is_not(None), commands.c.status.in_(UNFINISHED_STATUSES))


def due_scope(commands: Any) -> sa.ColumnElement[bool]:
    """The rows the relay claims: pending commands (jobs are claimed by their workers)."""
    return sa.and_(commands.c.status == "pending", commands.c.kind.is_(None))


def jobs_scope(commands: Any) -> sa.ColumnElement[bool]:
    """The rows a job runner claims: pending jobs."""
    return sa.and_(commands.c.status == "pending", commands.c.kind == "job")


@functools.cache
def metadata_for(prefix: str = "orch_") -> sa.MetaData:
    """The metadata holding the tables of the outbox with this table prefix."""
    validate_prefix(prefix)
    metadata = sa.MetaData()
    status_list = ", ".join(f"'{s}'" for s in STATUSES)
    commands = sa.Table(
        f"{prefix}commands",
        metadata,
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("input", JSONDocument, nullable=False),
        sa.Column("output", JSONDocument, nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("retries_left", sa.Integer(), nullable=False),
        sa.Column("timeout", sa.Float(), nullable=False),
        sa.Column("scheduled_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("dispatched_at", UTCDateTime(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("error_type", sa.String(200), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_traceback", sa.Text(), nullable=True),
        sa.Column("parent_id", sa.Uuid(), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("unique_key", sa.String(200), nullable=True),
        sa.Column("cancel_requested_at", UTCDateTime(), nullable=True),
        sa.Column("tenant", sa.String(200), nullable=True),
        sa.Column("batch_id", sa.Uuid(), nullable=True),
        # The rest of a durable chain: steps materialised when this command completes.
        sa.Column("chain", JSONDocument, nullable=True),
        # NULL for a command; 'job' for a long-running job (claimed by its worker, never published).
        sa.Column("kind", sa.String(8), nullable=True),
        # The trace context of the push (W3C traceparent / tracestate), when a tracer recorded it.
        sa.Column("trace", JSONDocument, nullable=True),
        sa.CheckConstraint(f"status IN ({status_list})", name=f"{prefix}commands_status_check"),
        sa.CheckConstraint("retries_left >= 0 AND retries >= 0", name=f"{prefix}commands_retries_check"),
        sa.CheckConstraint("timeout > 0", name=f"{prefix}commands_timeout_check"),
    )
    c = commands.c
    _partial(f"{prefix}commands_due_idx", c.priority.desc(), c.scheduled_at, where=due_scope(commands))
    # Jobs waiting for a worker with room, per target in claim order.
    _partial(f"{prefix}commands_jobs_idx", c.target, c.priority.desc(), c.scheduled_at, where=jobs_scope(commands))
    _partial(f"{prefix}commands_lease_idx", c.lease_expires_at, where=c.status.in_(("dispatched", "running")))
    # Only the rows that have one: a root command (most of them) adds no entry.
    _partial(f"{prefix}commands_parent_idx", c.parent_id, where=c.parent_id.is_not(None))
    # At most one unfinished command per unique key; a finished one frees its key.
    _partial(f"{prefix}commands_unique_idx", c.unique_key, where=unique_scope(commands), unique=True)
    # Unfinished rows per target (in-flight caps, drain checks). No index leads with
    # ``status`` over all rows: with stale statistics the planner took one for the fenced
    # ``WHERE id = ? AND status = ?`` of every start and completion and walked every row
    # in that status; now only the primary key can serve those, whatever the statistics.
    _partial(f"{prefix}commands_unfinished_idx", c.target, c.status, where=c.status.in_(UNFINISHED_STATUSES))
    # Retention clean-up (oldest final rows first) and the dead-letter listing.
    _partial(f"{prefix}commands_finished_idx", c.finished_at, where=c.status.in_(FINAL_STATUSES))
    _partial(f"{prefix}commands_failed_idx", c.created_at, where=c.status == "failed")
    # Serves "is any member of this batch unfinished?" (one probe per finishing member) and batch statistics.
    sa.Index(f"{prefix}commands_batch_idx", c.batch_id, c.status, postgresql_where=c.batch_id.is_not(None))
    _partial(f"{prefix}commands_tenant_idx", c.tenant, c.status, where=c.tenant.is_not(None))
    # Fair shares: the tenants with due rows (a skip scan) and each tenant's rows in claim order.
    # Rows without a tenant (most, where tenants are not used) add no entry.
    _partial(
        f"{prefix}commands_due_tenant_idx",
        c.tenant,
        c.priority.desc(),
        c.scheduled_at,
        where=sa.and_(due_scope(commands), c.tenant.is_not(None)),
    )
    _add_support_tables(metadata, prefix)
    attempts = _add_attempts_table(metadata, prefix)
    for ddl in notify_ddl(prefix):
        event.listen(commands, "after_create", sa.DDL(ddl).execute_if(dialect="postgresql"))  # type: ignore[no-untyped-call]
    for dialect, statements in history_ddl(prefix).items():
        for ddl in statements:  # after the attempts table exists: the trigger writes into it
            ddl_text = sa.DDL(ddl.replace("%", "%%"))  # type: ignore[no-untyped-call]  # DDL formats with %
            event.listen(attempts, "after_create", ddl_text.execute_if(dialect=dialect))  # type: ignore[no-untyped-call]
    event.listen(
        commands,
        "after_drop",
        sa.DDL(drop_notify_ddl(prefix)).execute_if(dialect="postgresql"),  # type: ignore[no-untyped-call]
    )
    event.listen(
        attempts,
        "after_drop",
        sa.DDL(f"DROP FUNCTION IF EXISTS {prefix}commands_history() CASCADE").execute_if(dialect="postgresql"),  # type: ignore[no-untyped-call]
    )
    return metadata


#: Attempts kept per command in the history, and the longest message and traceback kept.
HISTORY_ATTEMPTS = 25
HISTORY_MESSAGE_CHARS = 4_000
HISTORY_TRACEBACK_CHARS = 16_000
#: The endings of a running attempt the history keeps (a success is the command row itself).
_HISTORY_WHEN = "OLD.status = 'running' AND NEW.status IN ('pending', 'failed', 'canceled')"
_HISTORY_COLUMNS = (
    "command_id, attempt, worker, started_at, finished_at, outcome, error_type, error_message, error_traceback"
)
SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"


def _add_attempts_table(metadata: sa.MetaData, prefix: str) -> sa.Table:
    """``{prefix}attempts``: every attempt that ended without a success (the last one is also on its command)."""
    return sa.Table(
        f"{prefix}attempts",
        metadata,
        sa.Column(
            "command_id",
            sa.Uuid(),
            sa.ForeignKey(f"{prefix}commands.id", ondelete="CASCADE", name=f"{prefix}attempts_command_fkey"),
            primary_key=True,
        ),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("error_type", sa.String(200), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_traceback", sa.Text(), nullable=True),
    )


def history_ddl(prefix: str) -> dict[str, list[str]]:
    """Per dialect: a row trigger that keeps an attempt's ending in the history when a running attempt ends without
    a success (retried, failed, canceled, handed back), bounded to the last attempts and to a size.

    Its ``WHEN`` is false for every statement of the hot path (a start, a completion), so those pay nothing.
    """
    p = validate_prefix(prefix)
    keep = HISTORY_ATTEMPTS
    values = (
        "NEW.id, OLD.attempt, OLD.worker, OLD.started_at, {now}, NEW.outcome, NEW.error_type, "
        f"substr(NEW.error_message, 1, {HISTORY_MESSAGE_CHARS}), "
        f"substr(NEW.error_traceback, 1, {HISTORY_TRACEBACK_CHARS})"
    )
    return {
        "postgresql": [
            f"CREATE OR REPLACE FUNCTION {p}commands_history() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"INSERT INTO {p}attempts ({_HISTORY_COLUMNS}) VALUES ({values.format(now='now()')}) "
            "ON CONFLICT (command_id, attempt) DO NOTHING; "
            f"DELETE FROM {p}attempts WHERE command_id = NEW.id AND attempt <= OLD.attempt - {keep}; "
            "RETURN NULL; END $$",
            f"CREATE TRIGGER {p}commands_history AFTER UPDATE OF status ON {p}commands FOR EACH ROW "
            f"WHEN ({_HISTORY_WHEN}) EXECUTE FUNCTION {p}commands_history()",
        ],
        "sqlite": [
            f"CREATE TRIGGER IF NOT EXISTS {p}commands_history AFTER UPDATE OF status ON {p}commands FOR EACH ROW "
            f"WHEN {_HISTORY_WHEN} BEGIN "
            f"INSERT OR IGNORE INTO {p}attempts ({_HISTORY_COLUMNS}) "
            f"VALUES ({values.format(now=SQLITE_NOW)}); "
            f"DELETE FROM {p}attempts WHERE command_id = NEW.id AND attempt <= OLD.attempt - {keep}; END",
        ],
    }


BATCH_STATUSES: tuple[str, ...] = tuple(b.value for b in BatchStatus)


def _add_support_tables(metadata: sa.MetaData, prefix: str) -> None:
    batch_list = ", ".join(f"'{s}'" for s in BATCH_STATUSES)
    batches = sa.Table(
        f"{prefix}batches",
        metadata,
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("tenant", sa.String(200), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False, server_default="batch"),
        sa.Column("status", sa.String(16), nullable=False, server_default="open"),
        # A step (see canvas.py) materialised once, when every member is final.
        sa.Column("continuation", JSONDocument, nullable=True),
        sa.Column("continuation_id", sa.Uuid(), nullable=True),
        sa.Column("parent_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint(f"status IN ({batch_list})", name=f"{prefix}batches_status_check"),
    )
    sa.Index(
        f"{prefix}batches_open_idx",
        batches.c.created_at,
        postgresql_where=batches.c.status == "open",
        sqlite_where=batches.c.status == "open",
    )
    sa.Index(f"{prefix}batches_tenant_idx", batches.c.tenant)
    sa.Table(
        f"{prefix}schedules",
        metadata,
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("command", sa.String(200), nullable=False),
        sa.Column("input", JSONDocument, nullable=False),
        sa.Column("cron", sa.String(100), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False, server_default="UTC"),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=True),
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("timeout", sa.Float(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("is_unique", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("next_run_at", UTCDateTime(), nullable=False),
        sa.Column("last_run_at", UTCDateTime(), nullable=True),
        sa.Column("last_command_id", sa.Uuid(), nullable=True),
        sa.Column("skipped", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    sa.Table(
        f"{prefix}pauses",
        metadata,
        # scope: 'all' (value ''), 'target' or 'tenant'.
        sa.Column("scope", sa.String(16), primary_key=True),
        sa.Column("value", sa.String(200), primary_key=True),
        sa.Column("paused_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("scope IN ('all', 'target', 'tenant')", name=f"{prefix}pauses_scope_check"),
    )
    # Flow control: the token bucket of each rate-limited key (a target, ``command:x``, ``tenant:y``).
    # A bucket that refilled to full is deleted, so the table holds only the recently busy keys.
    sa.Table(
        f"{prefix}limits",
        metadata,
        sa.Column("key", sa.String(220), primary_key=True),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    # Relays waiting for a NOTIFY (the trigger notifies only while one waits; see notify_function).
    sa.Table(
        f"{prefix}listeners",
        metadata,
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("idle_until", UTCDateTime(), nullable=True),
    )
    sa.Table(
        f"{prefix}workers",
        metadata,
        # the worker's Celery nodename; a new incarnation (a restart) replaces the row
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("incarnation", sa.String(32), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("pool", sa.String(32), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("queues", JSONDocument, nullable=False),
        sa.Column("max_jobs", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
    )


def notify_channel(prefix: str) -> str:
    """The PostgreSQL channel a commit that inserted commands notifies."""
    return f"{validate_prefix(prefix)}commands"


def notify_function(prefix: str) -> str:
    """The trigger's function: NOTIFY only while some relay waits for it (``{prefix}listeners``).

    A transaction that notified takes a lock of the whole cluster at commit, so many
    pushing transactions that all notify commit one at a time. A relay marks itself idle
    just before it waits for a notification (until a little past its poll interval) and
    busy when it wakes: under load the relay is busy, polling on its own, and pushes do
    not notify; at rest a push wakes it at once.
    """
    channel, p = notify_channel(prefix), validate_prefix(prefix)
    return (
        f"CREATE OR REPLACE FUNCTION {p}commands_notify() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF EXISTS (SELECT 1 FROM {p}listeners WHERE idle_until > now()) THEN PERFORM pg_notify('{channel}', ''); "
        "END IF; RETURN NULL; END $$"
    )


def notify_ddl(prefix: str) -> list[str]:
    """A statement-level trigger: a transaction that inserts commands NOTIFYs an idle relay on commit.

    Statement-level and with an empty payload, so PostgreSQL folds a transaction's
    notifications into one; a bulk push costs one notification, not one per row.
    """
    return [
        notify_function(prefix),
        f"CREATE TRIGGER {prefix}commands_notify AFTER INSERT ON {prefix}commands "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {prefix}commands_notify()",
    ]


def drop_notify_ddl(prefix: str) -> str:
    """Drops the notify function (the trigger goes with its table)."""
    return f"DROP FUNCTION IF EXISTS {validate_prefix(prefix)}commands_notify()"


def commands_table(prefix: str = "orch_") -> sa.Table:
    """The ``{prefix}commands`` table."""
    return metadata_for(prefix).tables[f"{prefix}commands"]


def batches_table(prefix: str = "orch_") -> sa.Table:
    """The ``{prefix}batches`` table."""
    return metadata_for(prefix).tables[f"{prefix}batches"]


def schedules_table(prefix: str = "orch_") -> sa.Table:
    """The ``{prefix}schedules`` table."""
    return metadata_for(prefix).tables[f"{prefix}schedules"]


def pauses_table(prefix: str = "orch_") -> sa.Table:
    """The ``{prefix}pauses`` table."""
    return metadata_for(prefix).tables[f"{prefix}pauses"]


def attempts_table(prefix: str = "orch_") -> sa.Table:
    """The ``{prefix}attempts`` table (the attempt history)."""
    return metadata_for(prefix).tables[f"{prefix}attempts"]


def listeners_table(prefix: str = "orch_") -> sa.Table:
    """The ``{prefix}listeners`` table (relays waiting for a NOTIFY)."""
    return metadata_for(prefix).tables[f"{prefix}listeners"]


def limits_table(prefix: str = "orch_") -> sa.Table:
    """The ``{prefix}limits`` table (the rate limits' token buckets)."""
    return metadata_for(prefix).tables[f"{prefix}limits"]


def workers_table(prefix: str = "orch_") -> sa.Table:
    """The ``{prefix}workers`` table (the worker registry)."""
    return metadata_for(prefix).tables[f"{prefix}workers"]


def row_defaults() -> dict[str, Any]:
    """Column values every new row starts with (set in Python so bulk inserts stay simple)."""
    return {"status": "pending", "priority": 0, "attempt": 0}
