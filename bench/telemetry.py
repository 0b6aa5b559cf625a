"""Section ``telemetry``: the cost of tracing and metrics, end to end, on and off side by side.

The same no-op throughput run as ``throughput`` (RabbitMQ, threads -c8 and prefork -c2),
three times per round: as if the extra were not installed (``absent``: the relay and the
worker cannot import opentelemetry), with the extra installed and no SDK set up
(``installed``: the API alone, as most processes have it), and with the OpenTelemetry SDK
set up in every process (``on``); the pushing side (this process) has its telemetry off
but in ``on``. ``on`` has a tracer provider whose batch processor hands every span
to an exporter that drops it (the cost of an exporter's work is the exporter's), and a
meter provider with a pull reader (as Prometheus reads). Spans: a create span per push
batch, a publish span per message, a process span per attempt; every counter and
histogram recorded. Run it last: the bench process keeps the SDK it set up.
"""

from __future__ import annotations

from typing import Any

from bench import common
from bench.app import build, configure_sdk
from bench.common import BROKERS, Run, Section, Sizes
from bench.throughput import POOLS, outbox_run


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    n, warm = sizes.throughput_n, sizes.warmup
    broker = "rabbitmq"
    section.setup.update(
        commands_per_run=n,
        broker=broker,
        on="OpenTelemetry SDK: BatchSpanProcessor to a dropping exporter, MeterProvider with a pull reader",
        installed="the extra installed, no SDK set up",
        absent="opentelemetry unimportable in the relay and the worker",
        rounds=f"{sizes.rounds}, interleaved; the best of each side",
    )
    off = build(BROKERS[broker], run.prefix("tmoff"), telemetry=False)
    configure_sdk()
    on = build(BROKERS[broker], run.prefix("tmon"))
    for bench in (off, on):
        bench.outbox.create_tables()
    try:
        for pool, conc in POOLS:
            tag = f"tm-{pool}"
            runs: dict[str, list[Any]] = {"absent": [], "installed": [], "on": []}
            for i in range(sizes.rounds):
                runs["absent"].append(outbox_run(run, off, broker, pool, conc, n, warm, f"{tag}-ab{i}", otel="absent"))
                runs["installed"].append(outbox_run(run, off, broker, pool, conc, n, warm, f"{tag}-in{i}"))
                runs["on"].append(outbox_run(run, on, broker, pool, conc, n, warm, f"{tag}-on{i}", otel="1"))
            best = {k: max(v, key=lambda t: t.rate).rate for k, v in runs.items()}
            for variant, baseline, text in (
                ("on", "absent", "tracing and metrics on"),
                ("installed", "absent", "extra installed, no SDK set up"),
            ):
                section.metrics.append(
                    common.Metric(
                        f"no-op e2e, {text}, {broker}, {pool} -c{conc}",
                        best[variant],
                        best[baseline],
                        "cmd/s",
                        "extra not installed",
                    )
                )
    finally:
        for bench in (off, on):
            common.drop_outbox(bench.outbox)
