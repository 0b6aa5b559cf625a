"""Section ``memory``: RSS of the relay process and of the worker process while N commands go through.

RabbitMQ, one ``celery worker -P threads -c 8`` (one process) and the relay subprocess
(``orch-outbox relay``). Commands are pushed in chunks with a bounded backlog; VmRSS is
read from ``/proc/<pid>/status`` once the first 10 % have run (warm) and when all N have
completed (end). Baseline: a plain Celery worker with the same pool running the same N
no-op tasks (there is no relay on that side).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench import common
from bench.app import BenchApp, build
from bench.common import BROKERS, Run, Section, Sizes, Target
from bench.throughput import push_commands, start_outbox_services, wait_budget, wait_outbox_done, warm_outbox

POOL, CONCURRENCY = "threads", 8
#: RSS growth from warm to end that still counts as flat.
FLAT = 0.10


def chunk(n: int) -> int:
    return max(100, min(10_000, n // 20))


def pace(n: int, key: str, send: Callable[[int], None], on_warm: Callable[[], None], watch: list[common.Proc]) -> None:
    """Send ``n`` in chunks of n/20 (≤ 10 000) keeping at most two chunks unfinished; ``on_warm`` once 10 % ran."""
    chunk_size = chunk(n)
    warm_at = max(1, n // 10)
    warmed = False
    sent = 0
    deadline = time.monotonic() + wait_budget(n)
    while sent < n:
        if time.monotonic() > deadline:
            raise common.BenchError(f"memory run: only {sent} of {n} sent before the deadline")
        target = sent - 2 * chunk_size
        common.wait_until(
            lambda t=target: common.counter(key) >= t, wait_budget(chunk_size), "the backlog", watch=watch
        )
        size = min(chunk_size, n - sent)
        send(size)
        sent += size
        if not warmed and sent >= warm_at:
            common.wait_until(lambda: common.counter(key) >= warm_at, wait_budget(warm_at), "warm-up", watch=watch)
            on_warm()
            warmed = True
    common.wait_until(lambda: common.counter(key) >= n, wait_budget(n), f"{n} to run", watch=watch)


def outbox_memory(run: Run, bench: BenchApp, n: int, warmup: int) -> dict[str, float]:
    queue = run.queue("mem-o")
    key = run.key("mem-o")
    rss: dict[str, float] = {}
    with common.processes() as procs:
        relay, worker = start_outbox_services(run, bench, "rabbitmq", queue, POOL, CONCURRENCY, "mem-o", procs)
        warm_outbox(run, bench, queue, warmup, "mem-o", procs)
        rss["relay_start"], rss["worker_start"] = common.rss_mib(relay.pid), common.rss_mib(worker.pid)

        def on_warm() -> None:
            rss["relay_warm"], rss["worker_warm"] = common.rss_mib(relay.pid), common.rss_mib(worker.pid)

        pace(n, key, lambda size: push_commands(bench, queue, key, size), on_warm, procs)
        wait_outbox_done(bench, key, n, procs)
        rss["relay_end"], rss["worker_end"] = common.rss_mib(relay.pid), common.rss_mib(worker.pid)
    common.purge_queue(bench.app, queue, delete=True)
    return rss


def celery_memory(run: Run, bench: BenchApp, n: int, warmup: int) -> dict[str, float]:
    queue = run.queue("mem-c")
    key = run.key("mem-c")
    env = common.subprocess_env(BROKERS["rabbitmq"], bench.outbox.settings.table_prefix)
    common.purge_queue(bench.app, queue)
    rss: dict[str, float] = {}
    with common.processes() as procs:
        worker = common.celery_worker(run, "mem-c-worker", env, queue, POOL, CONCURRENCY)
        procs.append(worker)
        warm = run.key("mem-c:warm")
        for _ in range(warmup):
            bench.plain_noop.apply_async((warm,), queue=queue)
        common.wait_until(lambda: common.counter(warm) >= warmup, common.START_TIMEOUT, "warm-up tasks", watch=procs)
        rss["worker_start"] = common.rss_mib(worker.pid)

        def send(size: int) -> None:
            with bench.app.producer_or_acquire() as producer:
                for _ in range(size):
                    bench.plain_noop.apply_async((key,), queue=queue, producer=producer)

        def on_warm() -> None:
            rss["worker_warm"] = common.rss_mib(worker.pid)

        pace(n, key, send, on_warm, procs)
        rss["worker_end"] = common.rss_mib(worker.pid)
    common.purge_queue(bench.app, queue, delete=True)
    return rss


def growth(rss: dict[str, float], who: str) -> float:
    return (rss[f"{who}_end"] - rss[f"{who}_warm"]) / rss[f"{who}_warm"]


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    n = sizes.memory_n
    bench = build(BROKERS["rabbitmq"], run.prefix("mem"))
    bench.outbox.create_tables()
    try:
        ours = outbox_memory(run, bench, n, sizes.warmup)
        base = celery_memory(run, bench, n, sizes.warmup)  # the same app: its worker checks the outbox tables too
    finally:
        common.drop_outbox(bench.outbox)
    section.setup.update(commands=f"{n:,}", warm="after the first 10 %", pool=f"{POOL} -c{CONCURRENCY}", chunk=chunk(n))
    size = f"{n:,} cmds"
    flat = Target("value_max", 100 * FLAT, f"≤ {100 * FLAT:.0f} % (flat)")
    section.metrics += [
        common.Metric("relay RSS, warm", ours["relay_warm"], None, "MiB"),
        common.Metric("relay RSS, end", ours["relay_end"], None, "MiB"),
        common.Metric(f"relay RSS growth, warm → end of {size}", 100 * growth(ours, "relay"), None, "%", target=flat),
        common.Metric("worker RSS, warm", ours["worker_warm"], base["worker_warm"], "MiB", "Celery worker"),
        common.Metric("worker RSS, end", ours["worker_end"], base["worker_end"], "MiB", "Celery worker"),
        common.Metric(
            f"worker RSS growth, warm → end of {size} (MiB)",
            ours["worker_end"] - ours["worker_warm"],
            base["worker_end"] - base["worker_warm"],
            "MiB",
            "Celery worker",
            compare=False,
        ),
        common.Metric(
            f"worker RSS growth, warm → end of {size}",
            100 * growth(ours, "worker"),
            100 * growth(base, "worker"),
            "%",
            "Celery worker",
            flat,
            compare=False,
        ),
    ]
    section.notes.append(
        f"RSS right after start-up: relay {ours['relay_start']:.0f} MiB, worker {ours['worker_start']:.0f} MiB "
        f"(Celery worker {base['worker_start']:.0f} MiB)"
    )
