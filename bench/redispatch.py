"""Section ``redispatch``: commands queued behind slow handlers are not published again (no redispatch storm).

2 000 commands of 50 ms on one ``-c2`` threads worker (about 40 a second), with the outbox's
defaults (an in-flight cap of 1 000 per target, so most messages wait in the broker far
longer than a dispatch lease), once with the default dispatch timeout (60 s) and once with
``outbox_dispatch_timeout=5``. Printed: attempts (dispatches) per command, from the rows'
own attempt numbers; the target is ≤ 1.02. Without the rescuer's look at the broker a
lease that lapses while its message waits its turn is redone, and a slow target turns
into a storm (16 372 attempts for 6 149 executions in an earlier run).
"""

from __future__ import annotations

import time

from bench import common
from bench.app import build
from bench.common import BROKERS, Run, Section, Sizes, Target

SECONDS = 0.05


def one_run(run: Run, sizes: Sizes, tag: str, dispatch_timeout: float | None) -> tuple[float, float]:
    """(attempts per command, seconds) of one run."""
    n = 2_000 if sizes.mode != "quick" else 300
    bench = build(BROKERS["rabbitmq"], run.prefix(tag))
    bench.outbox.create_tables()
    queue = run.queue(tag)
    extra = {"BENCH_OUTBOX_DEFAULTS": "1"}
    if dispatch_timeout is not None:
        extra["ORCH_OUTBOX_DISPATCH_TIMEOUT"] = str(dispatch_timeout)
    env = common.subprocess_env(BROKERS["rabbitmq"], bench.outbox.settings.table_prefix, **extra)
    key = run.key(tag)
    table = bench.outbox.store.table.name
    try:
        with common.processes() as procs:
            common.purge_queue(bench.app, queue)
            procs.append(common.outbox_relay(run, f"{tag}-relay", env))
            procs.append(common.celery_worker(run, f"{tag}-worker", env, queue, "threads", 2))
            sleep = bench.outbox.task("bench_sleep")
            t0 = time.perf_counter()
            for start in range(0, n, 1_000):
                with bench.outbox.engine.begin() as conn:
                    bench.outbox.push_many(conn, [sleep.s(key, SECONDS).set(target=queue)] * min(1_000, n - start))
            budget = n * SECONDS / 2 * 3 + 60
            common.wait_until(lambda: common.count_unfinished(table) == 0, budget, "every command finished", 0.5, procs)
            seconds = time.perf_counter() - t0
        attempts = common.pg_exec(f"SELECT sum(attempt) FROM {table}")[0][0]
        common.purge_queue(bench.app, queue, delete=True)
    finally:
        common.drop_outbox(bench.outbox)
    return attempts / n, seconds


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    default_ratio, default_s = one_run(run, sizes, "rdd", None)
    short_ratio, short_s = one_run(run, sizes, "rds", 5.0)
    section.setup.update(
        commands=2_000 if sizes.mode != "quick" else 300, handler=f"{SECONDS * 1000:.0f} ms", worker="-c2 threads"
    )
    bound = Target("value_max", 1.02, "≤ 1.02")
    section.metrics += [
        common.Metric("attempts per command, default settings", default_ratio, None, "x", target=bound),
        common.Metric("attempts per command, dispatch timeout 5 s", short_ratio, None, "x", target=bound),
    ]
    section.notes.append(f"runs took {default_s:.0f} s and {short_s:.0f} s")
