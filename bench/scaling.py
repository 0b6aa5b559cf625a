"""Section ``scaling``: N relays and M workers, each a process of its own, against one outbox table.

For each (relays, workers) pair: ``orch-outbox relay`` N times and ``celery worker -P threads
-c2`` M times on one RabbitMQ queue, then N no-op commands pushed and run to the end. Printed:
commands per second, and PostgreSQL's CPU per command (the user + system time of every
PostgreSQL server process, read from ``/proc`` before and after). On this 2-core machine
every process shares the same two cores, so the table shows where the cost per command goes
as processes are added, not how a cluster of machines would scale; docs/performance.md
reads it.
"""

from __future__ import annotations

import os
import time

from bench import common, cpu
from bench.app import build
from bench.common import BROKERS, Run, Section, Sizes
from bench.throughput import push_commands, wait_outbox_done, warm_outbox

SHAPES = ((1, 1), (1, 2), (2, 2), (1, 4), (2, 4), (4, 4), (2, 8), (4, 8))


def one_shape(run: Run, relays: int, workers: int, n: int) -> tuple[float, float]:
    """(commands per second, PostgreSQL CPU milliseconds per command) of one shape."""
    tag = f"sc{relays}x{workers}"
    bench = build(BROKERS["rabbitmq"], run.prefix(tag))
    bench.outbox.create_tables()
    queue = run.queue(tag)
    env = common.subprocess_env(BROKERS["rabbitmq"], bench.outbox.settings.table_prefix)
    try:
        with common.processes() as procs:
            common.purge_queue(bench.app, queue)
            for i in range(relays):
                procs.append(common.outbox_relay(run, f"{tag}-relay{i}", env))
            for i in range(workers):
                procs.append(common.celery_worker(run, f"{tag}-worker{i}", env, queue, "threads", 2))
            warm_outbox(run, bench, queue, 20 * workers, tag, procs)
            key = run.key(tag)
            meter = cpu.CpuMeter({})
            meter.start()
            t0 = time.perf_counter()
            push_commands(bench, queue, key, n)
            wait_outbox_done(bench, key, n, procs)
            seconds = time.perf_counter() - t0
            spent = meter.stop().get("postgres", 0.0)
        common.purge_queue(bench.app, queue, delete=True)
    finally:
        common.drop_outbox(bench.outbox)
    return n / seconds, spent * 1000 / n


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    n = 3_000 if sizes.mode != "quick" else 600
    rows = []
    for relays, workers in SHAPES:
        rate, pg_ms = one_shape(run, relays, workers, n)
        rows.append((relays, workers, rate, pg_ms))
        section.metrics.append(
            common.Metric(f"{relays} relay(s), {workers} worker(s) of -c2: cmd/s", rate, None, "cmd/s")
        )
        section.metrics.append(
            common.Metric(f"{relays} relay(s), {workers} worker(s): PostgreSQL CPU", pg_ms, None, "ms")
        )
    section.setup.update(commands=n, broker="rabbitmq", pool="threads -c2 per worker", cores=os.cpu_count())
    best = max(rows, key=lambda r: r[2])
    section.notes.append(
        f"best: {best[0]} relay(s) and {best[1]} worker(s), {best[2]:.0f} cmd/s; PostgreSQL CPU per command from "
        f"{min(r[3] for r in rows):.2f} to {max(r[3] for r in rows):.2f} ms"
    )
