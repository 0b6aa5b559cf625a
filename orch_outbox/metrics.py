"""Metrics for Prometheus: the outbox's OpenTelemetry instruments, the backlog gauges, and an HTTP endpoint.

``serve(outbox, port)`` (``orch-outbox metrics --port 9808``, or ``outbox_metrics_port``
on a worker or beat) installs a meter provider with OpenTelemetry's Prometheus reader,
unless the application installed one of its own, and serves ``/metrics`` with
``prometheus_client``. The backlog gauges (commands by target and status, the oldest
pending command's age, dead letters by target, and per limit key the commands in flight
and those held back by it) read numbers a thread refreshes every
``outbox_metrics_interval`` seconds with two grouped, index-served queries: a scrape
never runs a query.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, StoreUnavailable

if TYPE_CHECKING:
    from .flow import Plan
    from .store import Store

log = logging.getLogger("orch_outbox.metrics")


class Backlog:
    """The numbers behind the backlog gauges, refreshed by a thread of its own."""

    def __init__(self, store: Store, interval: float, plan: Callable[[], Plan] | None = None) -> None:
        """``plan``: the flow control in force (the relay's), for the limit gauges."""
        self.store = store
        self.interval = interval
        self.plan = plan
        #: per limit key: (in flight, due commands held by it now)
        self.limits: dict[str, tuple[int, int]] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.oldest: dict[str, float] = {}
        self.dead: dict[str, int] = {}
        self.refreshed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Read the backlog now; False if the database could not be reached (the last numbers stay)."""
        try:
            rows = self.store.backlog()
            dead = self.store.dead_letters()
            now = self.store.now()
            plan = self.plan() if self.plan is not None else None
            limits = self.store.limit_states(plan) if plan is not None and plan.limited else []
        except StoreUnavailable as exc:
            log.warning("metrics: backlog not refreshed: %s", exc)
            return False
        self.counts = {(target, status): n for target, status, n, _ in rows}
        self.oldest = {
            target: max((now - due).total_seconds(), 0.0)
            for target, status, _, due in rows
            if status == "pending" and isinstance(due, dt.datetime)
        }
        self.dead = dict(dead)
        self.limits = {s.key: (s.in_flight, s.due if s.held else 0) for s in limits}
        self.refreshed.set()
        return True

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="orch-outbox-backlog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()


def observe_backlog(backlog: Backlog) -> None:
    """Register the backlog gauges (observable: read at each export from the refreshed numbers)."""
    from opentelemetry import metrics as otel_metrics
    from opentelemetry.metrics import CallbackOptions, Observation

    def counts(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"target": t, "status": s}) for (t, s), n in backlog.counts.items()]

    def oldest(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(age, {"target": t}) for t, age in backlog.oldest.items()]

    def dead(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"target": t}) for t, n in backlog.dead.items()]

    def held(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"limit": key}) for key, (_, n) in backlog.limits.items()]

    def limited(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"limit": key}) for key, (n, _) in backlog.limits.items()]

    meter = otel_metrics.get_meter("orch_outbox")
    meter.create_observable_gauge(
        "orch_outbox.limit.waiting", [held], unit="{command}", description="due commands held back by a limit"
    )
    meter.create_observable_gauge(
        "orch_outbox.limit.in_flight", [limited], unit="{command}", description="commands in flight under a limit"
    )
    meter.create_observable_gauge(
        "orch_outbox.backlog", [counts], unit="{command}", description="unfinished commands by target and status"
    )
    meter.create_observable_gauge(
        "orch_outbox.oldest_pending.age", [oldest], unit="s", description="age of the oldest due pending command"
    )
    meter.create_observable_gauge(
        "orch_outbox.dead_letters", [dead], unit="{command}", description="failed commands by target"
    )


def install_prometheus() -> bool:
    """Install a meter provider exporting to Prometheus, unless one is set already; True if this one was installed."""
    try:
        from opentelemetry import metrics as otel_metrics
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
    except ImportError:
        raise ConfigurationError(
            "metrics for Prometheus need the otel extra: pip install 'orch-outbox[otel]'"
        ) from None
    if type(otel_metrics.get_meter_provider()).__name__ not in ("_ProxyMeterProvider", "NoOpMeterProvider"):
        log.info("metrics: the application's own meter provider is kept (add a PrometheusMetricReader to it)")
        return False
    otel_metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
    return True


def serve(port: int, address: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` of this process's meter provider on ``address:port``; returns the server."""
    install_prometheus()
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, address)
    log.info("metrics: serving Prometheus metrics on http://%s:%d/metrics", address, port)
    return server
