"""The benchmark's Celery app: one outbox and the no-op handlers of both sides.

The bench process builds one with :func:`build` per broker; a worker or relay subprocess
imports this module with ``BENCH_BROKER`` and ``BENCH_PREFIX`` set, which builds the
module-level ``app`` / ``outbox`` that ``celery -A bench.app worker`` and
``orch-outbox -A bench.app:outbox relay`` find.

Both sides run the same handler body, so they pay the same bookkeeping:

- ``bench_noop(key)`` / ``plain_noop(key)``: ``INCR key`` in Redis (the bench reads the count);
- ``bench_probe(key)`` / ``plain_probe(key)``: ``RPUSH key time.time()`` taken first thing
  in the handler (the bench ``BLPOP``s it to measure send → start).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery

from orch_outbox import Outbox
from orch_outbox.default import base_config

_redis: Any = None


def redis() -> Any:
    """This process's Redis client (redis-py resets its pool in a forked child)."""
    global _redis
    if _redis is None:
        import redis as redis_mod

        _redis = redis_mod.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    return _redis


@dataclass
class BenchApp:
    """A Celery app with an outbox attached and the four handlers."""

    app: Celery
    outbox: Outbox
    noop: Any
    probe: Any
    plain_noop: Any
    plain_probe: Any


def configure_sdk() -> None:
    """The OpenTelemetry SDK in this process: spans batched to an exporter that drops them, a pull metric reader."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropping(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))


def build(broker_url: str, prefix: str, database_url: str | None = None, telemetry: bool = True) -> BenchApp:
    """A Celery app on ``broker_url`` with an outbox whose tables have ``prefix``."""
    app = Celery(f"bench-{prefix}", set_as_current=False)
    config = base_config()
    config.update(
        broker_url=broker_url,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    app.config_from_object(config)
    url = database_url or os.environ.get("BENCH_DATABASE_URL", "postgresql://127.0.0.1/test")
    # No in-flight cap: the relay section publishes a backlog with no worker running, and
    # plain Celery, the baseline, fills the broker without one either.
    # BENCH_OUTBOX_DEFAULTS=1 (the redispatch section): the outbox's own defaults, in-flight cap included,
    # with ORCH_OUTBOX_* from the environment (e.g. a short dispatch timeout).
    caps = {} if os.environ.get("BENCH_OUTBOX_DEFAULTS") == "1" else {"max_in_flight": 0}
    outbox = Outbox(app, url, table_prefix=prefix, telemetry=telemetry, **caps)

    @outbox.command(name="bench_noop", retries=0)
    def noop(key: str) -> None:
        redis().incr(key)

    @outbox.command(name="bench_probe", retries=0)
    def probe(key: str) -> None:
        started = time.time()
        redis().rpush(key, repr(started))

    @outbox.command(name="bench_sleep", retries=0, timeout=30)
    def sleep(key: str, seconds: float) -> None:
        time.sleep(seconds)
        redis().incr(key)

    @app.task(name="plain_noop", ignore_result=True, shared=False)
    def plain_noop(key: str) -> None:
        redis().incr(key)

    @app.task(name="plain_probe", ignore_result=True, shared=False)
    def plain_probe(key: str) -> None:
        started = time.time()
        redis().rpush(key, repr(started))

    return BenchApp(app, outbox, noop, probe, plain_noop, plain_probe)


if os.environ.get("BENCH_PREFIX"):  # a worker or relay subprocess
    if os.environ.get("BENCH_OTEL") == "1":
        configure_sdk()
    _built = build(
        os.environ["BENCH_BROKER"], os.environ["BENCH_PREFIX"], telemetry=os.environ.get("BENCH_OTEL") != "0"
    )
    app = _built.app
    outbox = _built.outbox
