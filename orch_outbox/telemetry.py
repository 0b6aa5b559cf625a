"""Traces and metrics through OpenTelemetry, when it is installed (``pip install orch-outbox[otel]``).

Traces follow the messaging conventions: ``create {target}`` (PRODUCER) when commands
are inserted — in the caller's transaction, as a child of the caller's current span —
``publish {target}`` (CLIENT) in the relay, and ``process {target}`` (CONSUMER) around the
attempt on the worker. The context travels in the row (the ``trace`` column, W3C
``traceparent``/``tracestate``) and then in the message headers, so Celery's own
instrumentation on the worker continues the same trace; commands inserted while a
handler runs (chained commands, chain steps, continuations) are children of its span.

Metrics are instruments of the OpenTelemetry metrics API under ``orch_outbox.``; a
process exports them where its meter provider sends them (``metrics.py`` serves them
for Prometheus). Spans and metrics are made only once the process has set up an
OpenTelemetry SDK (a real tracer or meter provider); with the API alone, without
OpenTelemetry, or with ``outbox_telemetry = False``, every method here returns at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

log = logging.getLogger("orch_outbox.telemetry")

try:  # the optional extra
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, StatusCode

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised by the tests without the extra
    AVAILABLE = False

#: ``messaging.system`` of the outbox's spans.
SYSTEM = "orch_outbox"
#: Seconds between looks for an OpenTelemetry SDK while the process has none.
LOOK_AGAIN_SECONDS = 1.0

#: Counters of attempt endings and the like: metric name -> description.
COUNTERS = {
    "pushed": "commands inserted into the outbox (pushed, chained, continuations, schedule ticks)",
    "started": "attempts started by a worker",
    "completed": "attempts that succeeded",
    "retried": "attempts that failed and were retried",
    "failed": "commands that failed for good (dead letters)",
    "canceled": "commands canceled",
    "expired": "commands expired before they ran",
    "dropped": "messages dropped without running (by reason: stale, paused, fenced, malformed, expired)",
    "rescued": "leases the rescuer settled",
    "reallocated": "attempts returned from dead workers",
}


class Instruments:
    """The outbox's instruments on one meter."""

    def __init__(self, meter: Any) -> None:
        self.counters = {
            name: meter.create_counter(f"orch_outbox.commands.{name}", unit="{command}", description=text)
            for name, text in COUNTERS.items()
        }
        self.duration = meter.create_histogram(
            "orch_outbox.handler.duration", unit="s", description="time an attempt ran, start to recorded ending"
        )
        self.lag = meter.create_histogram(
            "orch_outbox.queue.lag", unit="s", description="time from a command's due time to its start"
        )
        self.batch_size = meter.create_histogram(
            "orch_outbox.relay.batch.size", unit="{message}", description="messages one relay claim published"
        )
        self.publish_duration = meter.create_histogram(
            "orch_outbox.relay.publish.duration", unit="s", description="time to publish one claimed batch"
        )


class Telemetry:
    """The spans and instruments of one outbox (no-ops when OpenTelemetry is absent or switched off)."""

    def __init__(self, enabled: bool = True) -> None:
        self.on = bool(enabled and AVAILABLE)
        self._tracer: Any = None
        self._instruments: Instruments | None = None
        self._tracer_look = self._meter_look = 0.0  # monotonic times of the next look for a provider

    @property
    def tracer(self) -> Any:
        """The tracer, once the process has a real tracer provider (an SDK); else None: no span is made.

        Without one, the provider is looked up again at most every ``LOOK_AGAIN_SECONDS`` (a
        look reads the environment; a worker would pay it for every command)."""
        if self._tracer is None and self.on and time.monotonic() >= self._tracer_look:
            provider = trace.get_tracer_provider()
            if not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
                self._tracer = provider.get_tracer("orch_outbox")
            else:
                self._tracer_look = time.monotonic() + LOOK_AGAIN_SECONDS
        return self._tracer

    @property
    def instruments(self) -> Instruments | None:
        """The instruments, once the process has a real meter provider; else None: nothing is counted (looked up
        again as the tracer's provider is)."""
        if self._instruments is None and self.on and time.monotonic() >= self._meter_look:
            provider = otel_metrics.get_meter_provider()
            if type(provider).__name__ not in ("_ProxyMeterProvider", "NoOpMeterProvider"):
                self._instruments = Instruments(provider.get_meter("orch_outbox"))
            else:
                self._meter_look = time.monotonic() + LOOK_AGAIN_SECONDS
        return self._instruments

    @property
    def active(self) -> bool:
        """True when spans or metrics are recorded (the extra is installed, on, and an SDK is set up)."""
        return self.on and (self.tracer is not None or self.instruments is not None)

    # -- counters -------------------------------------------------------------------------

    def count(self, what: str, n: int = 1, **labels: str) -> None:
        """Add ``n`` to the counter ``what`` (see :data:`COUNTERS`)."""
        instruments = self.instruments if self.on and n else None
        if instruments is not None:
            instruments.counters[what].add(n, labels)

    # -- pushing --------------------------------------------------------------------------

    def on_insert(self, rows: Sequence[dict[str, Any]], count: int) -> None:
        """Rows about to be inserted (``count`` rows, made from ``rows``): a create span, its context on the rows.

        The span is a child of the caller's current span; when no tracer records it the
        rows carry nothing.
        """
        if not self.on or not rows:
            return
        instruments, tracer = self.instruments, self.tracer
        first = rows[0]
        target = str(first.get("target") or "")
        if instruments is not None:
            if len(rows) == count:
                for row in rows:
                    instruments.counters["pushed"].add(
                        1, {"name": str(row.get("name")), "target": str(row.get("target"))}
                    )
            else:
                instruments.counters["pushed"].add(count, {"name": str(first.get("name")), "target": target})
        if tracer is None:
            return
        span = tracer.start_span(
            f"create {target}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "create",
                "messaging.destination.name": target,
                "messaging.batch.message_count": count,
                **({"messaging.message.id": str(first["id"])} if count == 1 and "id" in first else {}),
            },
        )
        try:
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=trace.set_span_in_context(span))
            if carrier:
                for row in rows:
                    if not row.get("trace"):
                        row["trace"] = carrier
        finally:
            span.end()

    # -- the relay ------------------------------------------------------------------------

    @contextlib.contextmanager
    def publishing(self, size: int) -> Iterator[None]:
        """Around the publish of one claimed batch: its size and duration."""
        instruments = self.instruments if self.on else None
        if instruments is None:
            yield
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            instruments.publish_duration.record(time.perf_counter() - began)
            instruments.batch_size.record(size)

    @contextlib.contextmanager
    def publish(self, carrier: Mapping[str, str] | None, command_id: Any, target: str) -> Iterator[dict[str, str]]:
        """Around one message's publish: a publish span in the row's trace; yields the headers that carry it on."""
        tracer = self.tracer if self.on and carrier else None
        if tracer is None or not carrier:
            yield {}
            return
        parent = propagate.extract(dict(carrier))
        with tracer.start_as_current_span(
            f"publish {target}",
            context=parent,
            kind=SpanKind.CLIENT,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.destination.name": target,
                "messaging.message.id": str(command_id),
            },
        ):
            headers: dict[str, str] = {}
            propagate.inject(headers)
            yield headers

    # -- the worker -----------------------------------------------------------------------

    @contextlib.contextmanager
    def process(self, name: str, target: str, command_id: Any, attempt: int, request: Any) -> Iterator[Observed]:
        """Around one attempt on the worker: a process span (CONSUMER) continuing the message's trace.

        Under Celery's own instrumentation its task span is current and becomes the
        parent; otherwise the context comes from the message headers. Yields an
        :class:`Observed`, whose ``ended(outcome)`` says how the attempt ended; an
        exception that escapes says it too (a failure is recorded on the span).
        """
        observed = Observed()
        tracer = self.tracer if self.on else None
        instruments = self.instruments if self.on else None
        if tracer is None:
            began = time.perf_counter()
            try:
                yield observed
            except BaseException as exc:
                observed.ended(_outcome_of(exc))
                raise
            finally:
                if instruments is not None:
                    labels = {"name": name, "target": target, "outcome": observed.outcome or "success"}
                    instruments.duration.record(time.perf_counter() - began, labels)
            return
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            carrier = {k: v for k in ("traceparent", "tracestate") if (v := getattr(request, k, None))}
            parent = propagate.extract(carrier) if carrier else None
        began = time.perf_counter()
        with tracer.start_as_current_span(
            f"process {target}",
            context=parent,
            kind=SpanKind.CONSUMER,
            record_exception=False,
            set_status_on_exception=False,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.destination.name": target,
                "messaging.message.id": str(command_id),
                "orch_outbox.command.name": name,
                "orch_outbox.attempt": attempt,
            },
        ) as span:
            try:
                yield observed
            except BaseException as exc:
                outcome = observed.outcome or _outcome_of(exc)
                observed.ended(outcome)
                if outcome in ("failure", "timeout", "retry"):
                    span.record_exception(exc)
                if outcome in ("failure", "timeout"):
                    span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
                raise
            finally:
                span.set_attribute("orch_outbox.outcome", observed.outcome or "success")
                if instruments is not None:
                    labels = {"name": name, "target": target, "outcome": observed.outcome or "success"}
                    instruments.duration.record(time.perf_counter() - began, labels)

    def started(self, name: str, target: str, lag: float | None) -> None:
        """An attempt started, ``lag`` seconds after its due time."""
        instruments = self.instruments if self.on else None
        if instruments is None:
            return
        labels = {"name": name, "target": target}
        instruments.counters["started"].add(1, labels)
        if lag is not None:
            instruments.lag.record(max(lag, 0.0), labels)


def _outcome_of(exc: BaseException) -> str:
    kind = type(exc).__name__
    if kind == "Retry":
        return "retry"
    if kind in ("CommandRevoked",):
        return "canceled"
    if kind in ("AttemptDropped",):
        return "dropped"
    if kind in ("TimeLimitExceeded", "CommandTimeout"):
        return "timeout"
    return "failure"


class Observed:
    """How one attempt ended, as the executor says it (``success``, ``retry``, ``failure``, ``canceled``...)."""

    __slots__ = ("outcome",)

    def __init__(self) -> None:
        self.outcome: str | None = None

    def ended(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome


#: The outbox's telemetry when none is configured (off).
OFF = Telemetry(enabled=False)
