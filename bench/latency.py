"""Section ``latency``: commit → handler-start with the listening relay, vs Celery's send → start.

RabbitMQ, threads pool, same concurrency on both sides. One command at a time: pushed in
its own transaction, committed, then the bench waits (``BLPOP``) for the handler's start
timestamp before the next push. The clock starts right BEFORE ``commit()`` (so the commit
itself is inside the figure, as ``apply_async`` is inside Celery's); the handler records
``time.time()`` first thing. Celery: ``time.time()`` right before ``apply_async`` → the
task's start.
"""

from __future__ import annotations

import time

from bench import common
from bench.app import BenchApp, build
from bench.common import BROKERS, BenchError, Run, Section, Sizes, Target
from bench.throughput import start_outbox_services, warm_outbox

POOL, CONCURRENCY = "threads", 8
WARMUP_SAMPLES = 10
#: Longest one sample may take before the section gives up.
SAMPLE_TIMEOUT = 10


def started_at(key: str, procs: list[common.Proc]) -> float:
    """Pop the handler's start timestamp; raise if none comes in time."""
    item = common.redis_client().blpop([key], timeout=SAMPLE_TIMEOUT)
    if item is None:
        for proc in procs:
            proc.check()
        raise BenchError(f"no handler started within {SAMPLE_TIMEOUT}s")
    return float(item[1])


def outbox_samples(run: Run, bench: BenchApp, samples: int) -> tuple[list[float], list[float]]:
    """(commit → start, commit duration) in seconds, one command at a time."""
    queue = run.queue("lat-o")
    key = run.key("lat-o")
    sig = bench.probe.s(key).set(target=queue)
    latencies: list[float] = []
    commits: list[float] = []
    with common.processes() as procs:
        start_outbox_services(run, bench, "rabbitmq", queue, POOL, CONCURRENCY, "lat-o", procs)
        warm_outbox(run, bench, queue, CONCURRENCY, "lat-o", procs)
        for i in range(WARMUP_SAMPLES + samples):
            with bench.outbox.engine.connect() as conn:
                bench.outbox.push(conn, sig)
                before = time.time()
                conn.commit()
                after = time.time()
            start = started_at(key, procs)
            if i >= WARMUP_SAMPLES:
                latencies.append(start - before)
                commits.append(after - before)
    common.purge_queue(bench.app, queue, delete=True)
    return latencies, commits


def celery_samples(run: Run, bench: BenchApp, samples: int) -> list[float]:
    """send → start in seconds, one task at a time."""
    queue = run.queue("lat-c")
    key = run.key("lat-c")
    env = common.subprocess_env(BROKERS["rabbitmq"], bench.outbox.settings.table_prefix)
    common.purge_queue(bench.app, queue)
    latencies: list[float] = []
    with common.processes() as procs:
        procs.append(common.celery_worker(run, "lat-c-worker", env, queue, POOL, CONCURRENCY))
        for i in range(WARMUP_SAMPLES + samples):
            before = time.time()
            bench.plain_probe.apply_async((key,), queue=queue)
            timeout = common.START_TIMEOUT if i == 0 else SAMPLE_TIMEOUT
            item = common.redis_client().blpop([key], timeout=timeout)
            if item is None:
                procs[0].check()
                raise BenchError(f"no Celery task started within {timeout}s")
            if i >= WARMUP_SAMPLES:
                latencies.append(float(item[1]) - before)
    common.purge_queue(bench.app, queue, delete=True)
    return latencies


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    samples = sizes.latency_samples
    bench = build(BROKERS["rabbitmq"], run.prefix("lat"))
    bench.outbox.create_tables()
    try:
        ours, commits = outbox_samples(run, bench, samples)
        base = celery_samples(run, bench, samples)
        poll = bench.outbox.settings.poll_interval
    finally:
        common.drop_outbox(bench.outbox)
    section.setup.update(
        samples=samples,
        broker="rabbitmq",
        pool=f"{POOL} -c{CONCURRENCY}",
        clock="outbox: right before commit(); Celery: right before apply_async()",
    )
    targets = {50: Target("value_max", 5.0, "≤ 5 ms"), 99: Target("value_max", 25.0, "≤ 25 ms")}
    for pct in (50, 95, 99):
        section.metrics.append(
            common.Metric(
                f"commit → start p{pct}",
                1000 * common.percentile(ours, pct),
                1000 * common.percentile(base, pct),
                "ms",
                "Celery send → start",
                targets.get(pct),
            )
        )
    section.metrics.append(
        common.Metric("max", 1000 * max(ours), 1000 * max(base), "ms", "Celery send → start"),
    )
    section.metrics.append(common.Metric("the commit itself, p50", 1000 * common.percentile(commits, 50), None, "ms"))
    section.notes.append(
        f"beat-only mode (no LISTEN, polling relay): a command waits for the next relay run, i.e. up to "
        f"outbox_poll_interval = {poll:g} s (≈ {poll / 2 * 1000:.0f} ms on average, ≈ {poll * 1000:.0f} ms at worst) "
        f"plus the figures above"
    )
