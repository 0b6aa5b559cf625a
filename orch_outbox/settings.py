"""Settings: Celery-style ``outbox_*`` keys, each overridable by ``ORCH_OUTBOX_*``.

Every setting lives in the Celery config next to Celery's own (``celeryconfig.py``,
``app.conf.update(...)``) under the key ``outbox_<name>``; the environment variable
``ORCH_OUTBOX_<NAME>`` wins over it. Values are validated once, when the outbox starts,
and a bad one raises :class:`~orch_outbox.errors.ConfigurationError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError
from .flow import Limit, parse_limits

PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]{0,29}")
TARGET_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,199}")
BACKOFF_KINDS = ("exponential", "fixed")
NOTIFY_MODES = ("idle", "always", "never")


def _doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class Settings:
    """The validated settings of one outbox. Build with :meth:`from_sources`."""

    database_url: str = _doc(
        "SQLAlchemy URL of the outbox database; empty means a SQLite file under `home`",
        "",
    )
    read_database_url: str = _doc(
        "SQLAlchemy URL of a standby for the operator's reads (the CLI's, the web page's, the metrics'); empty: the "
        "outbox database",
        "",
    )
    home: str = _doc("folder for the embedded default's SQLite file and broker", ".orch_outbox")
    table_prefix: str = _doc("prefix of the outbox tables (a plain SQL identifier)", "orch_")
    default_target: str = _doc("queue of commands that name none; empty: Celery's default queue", "")
    default_timeout: float = _doc("seconds a handler may run when its command sets none", 60.0)
    default_retries: int = _doc("retries after the first attempt when a command sets none", 3)
    retry_backoff: str = _doc("`exponential`, `fixed`, or a dotted path to a callable", "exponential")
    retry_backoff_base: float = _doc("seconds before the first retry (the fixed delay)", 1.0)
    retry_backoff_max: float = _doc("upper bound of a retry delay in seconds", 300.0)
    retry_jitter: bool = _doc("randomise exponential delays (full jitter)", True)
    poll_interval: float = _doc("seconds between relay runs driven by beat", 1.0)
    batch_size: int = _doc("most rows one relay claim takes", 200)
    max_in_flight: int = _doc("most messages per target published and not yet started (0: no limit)", 1000)
    lock_buffer: float = _doc("seconds added to the timeout to form a running lease", 10.0)
    timeout_grace: float = _doc(
        "seconds a handler may run past its timeout before a prefork worker ends its pool process", 5.0
    )
    dispatch_timeout: float = _doc("seconds a published message may wait to start before redispatch", 60.0)
    rescue_interval: float = _doc("seconds between runs of the lease rescuer driven by beat", 5.0)
    max_input_bytes: int = _doc("largest encoded input or output accepted, in bytes", 1_000_000)
    relaxed_commits: bool = _doc(
        "PostgreSQL: claims, attempt starts and heartbeats commit without waiting for the WAL flush",
        True,
    )
    persistent_messages: bool = _doc(
        "RabbitMQ writes each command's message to disk: a broker restart keeps the queued messages instead of "
        "losing them to a redispatch from the database once their dispatch lease lapses",
        False,
    )
    schedule_interval: float = _doc("seconds between checks for due cron schedules, driven by beat", 1.0)
    retention: float = _doc("seconds completed, canceled and expired rows are kept (0: forever)", 7 * 24 * 3600.0)
    failed_retention: float = _doc("seconds failed rows (the dead letters) are kept (0: forever)", 30 * 24 * 3600.0)
    cleanup_interval: float = _doc("seconds between retention clean-ups, driven by beat", 300.0)
    cleanup_batch: int = _doc("most rows one clean-up statement deletes", 1000)
    error_hook: str = _doc("dotted path of a callable given every failed attempt (e.g. for Sentry)", "")
    plain_tasks: bool = _doc("plain Celery tasks of the app may be pushed and run through the outbox", True)
    worker_heartbeat: float = _doc("seconds between a worker's renewals of its registry row", 2.0)
    worker_timeout: float = _doc(
        "seconds without a renewal after which a worker is dead and what it ran returns to pending", 10.0
    )
    max_jobs: int = _doc("most long-running jobs one worker runs at once (0: this worker runs none)", 10)
    job_retries: int = _doc("restarts of a job whose handler raised (a lost worker uses none)", 1000)
    telemetry: bool = _doc("OpenTelemetry spans and metrics, when the `otel` extra is installed", True)
    metrics_port: int = _doc("a worker or beat serves its metrics for Prometheus on this port (0: none)", 0)
    metrics_interval: float = _doc("seconds between the backlog queries behind the backlog gauges", 15.0)
    limits: tuple[Limit, ...] = _doc(
        "cluster-wide limits by key (a target, `command:NAME`, `tenant:NAME`, `tenant:*`): "
        "`{key: {'concurrency': N, 'rate': '100/m'}}`; the variable takes that mapping as JSON",
        (),
    )
    fair_tenants: bool = _doc("due commands of different tenants are claimed in turns, within each priority", True)
    notify: str = _doc(
        "when a push NOTIFYs the relay (PostgreSQL): `idle` (only while a relay waits for it), `always`, or `never` "
        "(relays poll every `poll_interval`, with jitter)",
        "idle",
    )
    broker_priority: bool = _doc(
        "messages carry their command's priority to the broker (RabbitMQ: with Celery's `task_queue_max_priority`)",
        False,
    )
    strict_order: bool = _doc(
        "a worker's queues (`-Q high,default,low`) are served in that order: a later one only while the earlier "
        "have nothing waiting",
        False,
    )

    @classmethod
    def from_sources(
        cls, conf: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Read ``outbox_*`` keys from ``conf``, then ``ORCH_OUTBOX_*`` from ``env``, then overrides."""
        conf = conf or {}
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f"outbox_{f.name}"
            if conf.get(key) is not None:
                values[f.name] = _coerce(f, conf[key], key)
            env_key = f"ORCH_OUTBOX_{f.name.upper()}"
            if env.get(env_key) not in (None, ""):
                values[f.name] = _coerce(f, env[env_key], env_key)
        unknown = [k for k in overrides if k not in {f.name for f in dataclasses.fields(cls)}]
        if unknown:
            raise ConfigurationError(f"unknown outbox setting(s): {', '.join(sorted(unknown))}")
        for name, value in overrides.items():
            values[name] = _coerce(_field(name), value, name)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise :class:`ConfigurationError` for the first invalid value."""
        for key, check, value in (
            ("outbox_table_prefix", validate_prefix, self.table_prefix),
            ("outbox_default_target", validate_target, self.default_target or "celery"),
        ):
            try:
                check(value)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{key}: {exc}") from None
        positive = (
            "default_timeout",
            "poll_interval",
            "lock_buffer",
            "timeout_grace",
            "dispatch_timeout",
            "rescue_interval",
            "schedule_interval",
            "cleanup_interval",
            "worker_heartbeat",
            "worker_timeout",
            "metrics_interval",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"outbox_{name} must be > 0, got {getattr(self, name)!r}")
        if self.default_retries < 0:
            raise ConfigurationError(f"outbox_default_retries must be >= 0, got {self.default_retries!r}")
        if self.max_in_flight < 0:
            raise ConfigurationError(f"outbox_max_in_flight must be >= 0, got {self.max_in_flight!r}")
        if not 1 <= self.batch_size <= 10_000:
            raise ConfigurationError(f"outbox_batch_size must be in 1..10000, got {self.batch_size!r}")
        if self.retry_backoff_base < 0 or self.retry_backoff_max < self.retry_backoff_base:
            raise ConfigurationError("outbox_retry_backoff_base must be >= 0 and <= outbox_retry_backoff_max")
        if self.retry_backoff not in BACKOFF_KINDS and "." not in self.retry_backoff:
            raise ConfigurationError(
                f"outbox_retry_backoff must be one of {BACKOFF_KINDS} or a dotted path, got {self.retry_backoff!r}"
            )
        for name in ("retention", "failed_retention"):
            if getattr(self, name) < 0:
                raise ConfigurationError(
                    f"outbox_{name} must be >= 0 (0 keeps rows forever), got {getattr(self, name)!r}"
                )
        if not 1 <= self.cleanup_batch <= 100_000:
            raise ConfigurationError(f"outbox_cleanup_batch must be in 1..100000, got {self.cleanup_batch!r}")
        if self.error_hook and not re.fullmatch(r"[A-Za-z_][\w.]*[.:][A-Za-z_]\w*", self.error_hook):
            raise ConfigurationError(
                f"outbox_error_hook must be a dotted path such as 'myapp.hooks.report', got {self.error_hook!r}"
            )
        if self.worker_timeout < 2 * self.worker_heartbeat:
            raise ConfigurationError(
                "outbox_worker_timeout must be at least twice outbox_worker_heartbeat "
                f"(got {self.worker_timeout!r} and {self.worker_heartbeat!r})"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigurationError(f"outbox_metrics_port must be a port number (0: none), got {self.metrics_port!r}")
        for name in ("max_jobs", "job_retries"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"outbox_{name} must be >= 0, got {getattr(self, name)!r}")
        if self.notify not in NOTIFY_MODES:
            raise ConfigurationError(f"outbox_notify must be one of {NOTIFY_MODES}, got {self.notify!r}")
        if self.max_input_bytes < 1024:
            raise ConfigurationError("outbox_max_input_bytes must be >= 1024")

    def resolved_database_url(self) -> str:
        """The database URL, or the embedded SQLite file under ``home``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{os.path.abspath(os.path.join(self.home, 'outbox.sqlite3'))}"


def describe() -> list[tuple[str, str, Any, str]]:
    """(config key, environment variable, default, meaning) of every setting."""
    return [
        (f"outbox_{f.name}", f"ORCH_OUTBOX_{f.name.upper()}", f.default, f.metadata["doc"])
        for f in dataclasses.fields(Settings)
    ]


def validate_prefix(prefix: str) -> str:
    """A table prefix must be a plain lowercase SQL identifier (it is spliced into DDL)."""
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise ConfigurationError(
            f"invalid table prefix {prefix!r}: use 1-30 characters of a-z, 0-9 and _, not starting with a digit"
        )
    return prefix


def validate_target(target: object) -> str:
    """A target is a Celery queue name: letters, digits and ``_ . : @ -``."""
    if not isinstance(target, str) or not TARGET_RE.fullmatch(target):
        raise ConfigurationError(
            f"invalid target {target!r}: a queue name of 1-200 characters from A-Z a-z 0-9 _ . : @ -"
        )
    return target


def _field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(Settings) if f.name == name)


def _coerce(f: dataclasses.Field[Any], value: Any, key: str) -> Any:
    kind: type = type(f.default)
    if kind is tuple:
        return parse_limits(value, key)
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError(value)
            return number
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except (TypeError, ValueError):
        raise ConfigurationError(f"{key}: expected {kind.__name__}, got {value!r}") from None
