"""Traces and metrics with the real OpenTelemetry SDK (in-memory span exporter and metric reader), in-process
worker; the Prometheus endpoint and the absence of the extra in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from orch_outbox import Outbox
from orch_outbox.testing import wait_until

from .support import run_worker, unique_target
from conftest import PG_URL
from support.procs import free_port, orch_outbox_cli

pytestmark = pytest.mark.pg

SPANS = InMemorySpanExporter()
READER = InMemoryMetricReader()


@pytest.fixture(scope="module", autouse=True)
def sdk() -> Iterator[None]:
    """The SDK's providers, set once for the process (OpenTelemetry allows no second global provider)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(SPANS))
        trace.set_tracer_provider(provider)
    if not isinstance(metrics.get_meter_provider(), MeterProvider):
        metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))
    yield


@pytest.fixture
def spans() -> InMemorySpanExporter:
    SPANS.clear()
    return SPANS


def _points(name: str) -> list[Any]:
    """Every data point of the metric ``name`` collected now."""
    data = READER.get_metrics_data()
    points: list[Any] = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    points.extend(metric.data.data_points)
    return points


def _sum(metric: str, **labels: str) -> float:
    """The counter's value (a histogram's count) over the points whose attributes include ``labels``."""
    total = 0.0
    for point in _points(metric):
        if all(point.attributes.get(k) == v for k, v in labels.items()):
            total += point.value if hasattr(point, "value") else point.count
    return total


def _named(spans: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name.startswith(prefix)]


def test_one_trace_from_the_request_through_relay_and_worker_to_the_handler(
    make_outbox: Callable[..., Outbox], spans: InMemorySpanExporter
) -> None:
    """Proves trace propagation through the row and the message: a push inside a request's span gets a create span
    (PRODUCER, child of the request), the relay's publish span is its child, the worker's process span (CONSUMER)
    the publish's child, all in the request's trace, with the messaging attributes; a chained command, pushed
    while the handler ran, is a child of the handler's span, in the same trace."""
    outbox = make_outbox()
    target = unique_target("trace")

    @outbox.command(target=target)
    def greet(name: str) -> str:
        return f"hello {name}"

    @outbox.command(target=target)
    def after(text: str) -> None: ...

    @greet.then
    def _(outcome: Any) -> list[Any]:
        return [after.s(outcome.output)]

    tracer = trace.get_tracer("the-app")
    with tracer.start_as_current_span("POST /greet") as request:
        command_id = greet.push(outbox.engine, "ada")
    assert outbox.get(command_id).trace["traceparent"].split("-")[1] == f"{request.get_span_context().trace_id:032x}"
    with run_worker(outbox.app, [target], pool="threads", concurrency=2):
        outbox.relay_once()
        wait_until(lambda: outbox.get(command_id).status == "completed", 20)
        (child,) = outbox.children(command_id)
        wait_until(lambda: outbox.relay_once() or outbox.get(child.id).status == "completed", 20)
    root = request.get_span_context()
    create = next(s for s in _named(spans, f"create {target}") if s.parent and s.parent.span_id == root.span_id)
    publish = next(s for s in _named(spans, f"publish {target}") if s.parent.span_id == create.context.span_id)
    process = next(s for s in _named(spans, f"process {target}") if s.parent.span_id == publish.context.span_id)
    assert {create.context.trace_id, publish.context.trace_id, process.context.trace_id} == {root.trace_id}
    assert (create.kind, publish.kind, process.kind) == (SpanKind.PRODUCER, SpanKind.CLIENT, SpanKind.CONSUMER)
    assert process.attributes["messaging.message.id"] == str(command_id)
    assert process.attributes["messaging.destination.name"] == target
    assert process.attributes["orch_outbox.outcome"] == "success"
    chained = [s for s in _named(spans, f"create {target}") if s.parent.span_id == process.context.span_id]
    assert chained and chained[0].context.trace_id == root.trace_id
    runs = _named(spans, f"process {target}")
    child_runs = [s for s in runs if s.attributes["messaging.message.id"] == str(child.id)]
    assert child_runs and child_runs[0].context.trace_id == root.trace_id


def test_a_failure_is_recorded_on_the_span_and_every_counter_moves(
    make_outbox: Callable[..., Outbox], spans: InMemorySpanExporter
) -> None:
    """Proves the failure on the span (ERROR status, the exception event, outcome retry then failure) and the
    metrics: pushed, started, retried, failed, completed, the handler duration and queue lag histograms, the relay's
    batch size, and dropped by reason (a duplicate message is dropped as stale)."""
    outbox = make_outbox()
    target = unique_target("metrics")

    @outbox.command(target=target, retries=1)
    def broken() -> None:
        raise ValueError("no such feed")

    @outbox.command(target=target)
    def fine() -> int:
        return 1

    before = {k: _sum(f"orch_outbox.commands.{k}", target=target) for k in ("pushed", "started", "completed")}
    failed_before = _sum("orch_outbox.commands.failed", name="broken")
    retried_before = _sum("orch_outbox.commands.retried", name="broken")
    stale_before = _sum("orch_outbox.commands.dropped", reason="stale")
    bad = broken.push(outbox.engine)
    good = fine.push(outbox.engine)
    with run_worker(outbox.app, [target], pool="threads", concurrency=2):
        wait_until(lambda: outbox.relay_once() >= 0 and outbox.get(bad).status == "failed", 20)
        wait_until(lambda: outbox.get(good).status == "completed", 20)
        outbox.executor.flush(5)
        outbox.relay._send(outbox.relay._open_producer(), _dispatch_of(outbox, good))  # a duplicate message
        wait_until(lambda: _sum("orch_outbox.commands.dropped", reason="stale") > stale_before, 20)
    runs = [s for s in _named(spans, f"process {target}") if s.attributes["messaging.message.id"] == str(bad)]
    assert [s.attributes["orch_outbox.outcome"] for s in runs] == ["retry", "failure"]
    assert runs[-1].status.status_code == StatusCode.ERROR
    assert any(e.name == "exception" and "no such feed" in str(e.attributes) for e in runs[-1].events)
    assert _sum("orch_outbox.commands.pushed", target=target) - before["pushed"] == 2
    assert _sum("orch_outbox.commands.started", target=target) - before["started"] == 3
    assert _sum("orch_outbox.commands.completed", target=target) - before["completed"] == 1
    assert _sum("orch_outbox.commands.retried", name="broken") - retried_before == 1
    assert _sum("orch_outbox.commands.failed", name="broken") - failed_before == 1
    assert _sum("orch_outbox.handler.duration", target=target, outcome="failure") >= 1
    assert _sum("orch_outbox.queue.lag", target=target) >= 3
    assert _sum("orch_outbox.relay.batch.size") >= 1


def test_cancel_expiry_and_rescue_are_counted(clocked_outbox: Outbox, fake_clock: Any) -> None:
    """Proves the counters of the endings that need no worker: a pending command canceled, a command claimed past
    its expiry, a lapsed lease settled by the rescuer."""
    outbox = clocked_outbox
    target = unique_target("endings")

    @outbox.command(target=target, timeout=5, retries=2)
    def job() -> None: ...

    before = {k: _sum(f"orch_outbox.commands.{k}") for k in ("canceled", "expired", "rescued")}
    outbox.cancel(job.push(outbox.engine))
    job.apply_async(expires=30)
    lapsing = job.push(outbox.engine)
    fake_clock.advance(60)
    assert outbox.relay_once() == 1  # the expiring one expires at the claim; the other is published
    assert outbox.store.start(lapsing, outbox.get(lapsing).attempt, "job", "w1", 7) is not None
    fake_clock.advance(60)
    assert outbox.rescue_once() >= 1
    after = {k: _sum(f"orch_outbox.commands.{k}") for k in ("canceled", "expired", "rescued")}
    assert {k: after[k] - before[k] for k in after} == {"canceled": 1, "expired": 1, "rescued": 1}


def _dispatch_of(outbox: Outbox, command_id: Any) -> Any:
    from orch_outbox.store import Dispatch

    row = outbox.get(command_id)
    return Dispatch(row.id, row.name, row.target, row.attempt, row.input, row.timeout, row.priority)


def test_the_prometheus_endpoint_serves_the_backlog_by_target_and_status(
    make_outbox: Callable[..., Outbox], tmp_path: Path
) -> None:
    """Proves `orch-outbox metrics --port`: scraped over HTTP and parsed with prometheus_client's parser, it lists
    the backlog by target and status, the oldest pending command's age and the dead letters (numbers a thread
    refreshes, not a query per scrape)."""
    outbox = make_outbox()
    target = unique_target("prom")

    @outbox.command(target=target)
    def waiting() -> None: ...

    for _ in range(3):
        waiting.push(outbox.engine)
    port = free_port()
    module = (
        "from celery import Celery\nfrom orch_outbox import Outbox\n"
        f"app = Celery('prom', broker='memory://')\noutbox = Outbox(app, {PG_URL!r}, "
        f"table_prefix={outbox.settings.table_prefix!r}, metrics_interval=0.5)\n"
    )
    (tmp_path / "prom_app.py").write_text(module)
    proc = subprocess.Popen(
        [*orch_outbox_cli(), "-A", "prom_app:outbox", "metrics", "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        text = wait_until(lambda: _scrape(port, target), 30, what="the metrics endpoint")
    finally:
        proc.terminate()
        proc.wait(10)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    backlog = [s for s in families["orch_outbox_backlog"].samples if s.labels.get("target") == target]
    assert [(s.labels["status"], s.value) for s in backlog] == [("pending", 3.0)]
    ages = [s for s in families["orch_outbox_oldest_pending_age_seconds"].samples if s.labels["target"] == target]
    assert ages and ages[0].value >= 0


def _scrape(port: int, target: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return text if target in text else None


def test_without_the_extra_nothing_is_imported_and_everything_works(tmp_path: Path) -> None:
    """Proves the extra is optional: with opentelemetry unimportable, the outbox pushes, relays and reads as
    before, its telemetry is off, and no opentelemetry module is loaded."""
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from celery import Celery
from orch_outbox import Outbox
app = Celery("no-otel", broker="memory://")
outbox = Outbox(app, "sqlite:///{tmp_path}/plain.sqlite3")
outbox.create_tables()

@outbox.command(target="q")
def hello() -> None: ...

cid = hello.push(outbox.engine)
outbox.relay_once()
print({{"telemetry": outbox.telemetry.on, "status": outbox.get(cid).status, "trace": outbox.get(cid).trace,
       "loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = eval(done.stdout.strip().splitlines()[-1])
    assert result == {"telemetry": False, "status": "dispatched", "trace": None, "loaded": []}


def test_telemetry_off_by_setting_records_nothing(make_outbox: Callable[..., Outbox], spans: Any) -> None:
    """Proves ``outbox_telemetry = False``: a push inside a traced request stores no trace and makes no span."""
    outbox = make_outbox(telemetry=False)
    target = unique_target("off")

    @outbox.command(target=target)
    def quiet() -> None: ...

    with trace.get_tracer("the-app").start_as_current_span("request"):
        command_id = quiet.push(outbox.engine)
    assert outbox.get(command_id).trace is None
    assert not _named(spans, f"create {target}")
    assert [s.name for s in spans.get_finished_spans()] == ["request"]
