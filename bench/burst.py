"""Section ``burst``: a burst of commands into an outbox whose statistics were taken while it was nearly empty.

PostgreSQL keeps a prepared statement's generic plan until the table is analysed again. A
worker whose start and outcome were planned while the table held a few rows (and was
analysed so) kept a sequential scan as their plan while a burst arrived, each start reading
the whole table. The hot path plans its statements again every ``REPLAN_SECONDS``.

Each run: a fresh table; a relay and a ``-c2`` prefork worker on RabbitMQ; a few commands;
``ANALYZE`` of the table, then either as it is (3 rows: **quiet**) or after 20 000 finished
rows were added (**busy**, the baseline); 40 commands more, so that the worker's statements
are prepared and run on those statistics; then N commands pushed at once, timed until the
handlers ran them all. The two kinds of run alternate; the best of each counts.
"""

from __future__ import annotations

import time

from bench import bigtable, common, throughput
from bench.app import build
from bench.common import BROKERS, Run, Section, Sizes, Target

#: Finished rows in the table when a busy outbox is analysed.
BUSY_ROWS = 20_000
#: Commands run on the analysed table before the burst: more than the six runs after which PostgreSQL keeps a
#: prepared statement's generic plan, on each of the worker's connections.
SETTLE = 40


def one_burst(run: Run, n: int, tag: str, busy: bool) -> float:
    """Commands a second of a burst of ``n`` into a table analysed quiet (or ``busy``)."""
    bench = build(BROKERS["rabbitmq"], run.prefix(tag))
    bench.outbox.create_tables()
    table = bench.outbox.store.table.name
    queue = run.queue(tag)
    try:
        with common.processes() as procs:
            throughput.start_outbox_services(run, bench, "rabbitmq", queue, "prefork", 2, tag, procs)
            throughput.warm_outbox(run, bench, queue, 3, f"{tag}-first", procs)
            if busy:
                bigtable.load_finished(bench, BUSY_ROWS)
            common.pg_exec(f"ANALYZE {table}")
            throughput.warm_outbox(run, bench, queue, SETTLE, f"{tag}-settle", procs)
            key = run.key(tag)
            t0 = time.perf_counter()
            throughput.push_commands(bench, queue, key, n)
            common.wait_until(lambda: common.counter(key) >= n, throughput.wait_budget(n), f"{n} commands", watch=procs)
            seconds = time.perf_counter() - t0
        common.purge_queue(bench.app, queue, delete=True)
    finally:
        common.drop_outbox(bench.outbox)
    return n / seconds


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    n = sizes.throughput_n * 3
    quiet: list[float] = []
    busy: list[float] = []
    for i in range(sizes.rounds):
        quiet.append(one_burst(run, n, f"bq{i}", busy=False))
        busy.append(one_burst(run, n, f"bb{i}", busy=True))
    section.setup.update(burst=n, worker="-c2 prefork, RabbitMQ", busy_rows=BUSY_ROWS, rounds=sizes.rounds)
    section.metrics.append(
        common.Metric(
            "a burst into an outbox analysed nearly empty",
            max(quiet),
            max(busy),
            "cmd/s",
            f"analysed with {BUSY_ROWS:,} rows",
            Target("ratio_min", 0.8, "≥ 0.8x"),
        )
    )
    section.notes.append(
        "runs: quiet " + ", ".join(f"{r:.0f}" for r in quiet) + "; busy " + ", ".join(f"{r:.0f}" for r in busy)
    )
