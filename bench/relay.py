"""Section ``relay``: dispatch rate of the relay vs Celery's own publish loop (RabbitMQ, no workers).

orch_outbox: N pending rows are inserted first (``push_many``); then ``outbox.relay_once()``
runs in this process until every row is dispatched — rows claimed, committed and published
per second. The claim is timed apart (a wrapper around ``Store.claim``) to show where the
time goes.

Celery: ``plain_noop.apply_async`` N times on one shared producer (``producer=``), the
fastest plain Celery publish loop. Both publish to a queue nobody consumes; it is
checked to hold N messages and purged after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench import common
from bench.app import BenchApp, build
from bench.common import BROKERS, BULK_SIZE, BenchError, Run, Section, Sizes, Target


class ClaimTimer:
    """Wraps ``Store.claim`` on one store instance: total seconds spent claiming, rows claimed."""

    def __init__(self, store: Any) -> None:
        self.seconds = 0.0
        self.rows = 0
        self.calls = 0
        self._claim: Callable[..., Any] = store.claim
        store.claim = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        batch = self._claim(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.rows += len(batch)
        self.calls += 1
        return batch


def insert_pending(bench: BenchApp, queue: str, key: str, n: int) -> None:
    """N pending rows, pushed with push_many in calls of 10 000."""
    sig = bench.noop.s(key).set(target=queue)
    for start in range(0, n, BULK_SIZE):
        with bench.outbox.engine.begin() as conn:
            bench.outbox.push_many(conn, [sig] * min(BULK_SIZE, n - start))


def relay_rate(bench: BenchApp, queue: str, n: int, timeout: float) -> tuple[float, ClaimTimer]:
    """Rows dispatched per second by ``relay_once`` over ``n`` pending rows already in the table."""
    timer = ClaimTimer(bench.outbox.store)
    deadline = time.monotonic() + timeout
    published = 0
    t0 = time.perf_counter()
    for _ in range(n + 10):  # each pass publishes at least one row, or the loop ends
        done = bench.outbox.relay_once()
        published += done
        if published >= n or not done or time.monotonic() > deadline:
            break
    seconds = time.perf_counter() - t0
    if published < n:
        raise BenchError(f"the relay published {published} of {n} rows in {seconds:.1f}s")
    return published / seconds, timer


def warm_relay(run: Run, bench: BenchApp, queue: str) -> None:
    """One row through the relay and one plain publish, so that connections exist before the clock."""
    insert_pending(bench, queue, run.key("relay:warm"), 1)
    bench.outbox.relay_once()
    bench.plain_noop.apply_async((run.key("relay:warm"),), queue=queue)
    common.purge_queue(bench.app, queue)


def celery_publish_rate(bench: BenchApp, queue: str, key: str, n: int) -> float:
    """Messages per second of ``apply_async`` in a loop on one shared producer."""
    with bench.app.producer_or_acquire() as producer:
        t0 = time.perf_counter()
        for _ in range(n):
            bench.plain_noop.apply_async((key,), queue=queue, producer=producer)
        return n / (time.perf_counter() - t0)


def celery_confirmed_rate(bench: BenchApp, queue: str, key: str, n: int) -> float:
    """The same loop with publisher confirms on (as the relay publishes), one confirm per message."""
    conn = bench.app.connection_for_write(transport_options={"confirm_publish": True})
    try:
        producer = bench.app.amqp.Producer(conn)
        t0 = time.perf_counter()
        for _ in range(n):
            bench.plain_noop.apply_async((key,), queue=queue, producer=producer)
        return n / (time.perf_counter() - t0)
    finally:
        conn.release()


def check_depth(bench: BenchApp, queue: str, n: int, what: str) -> None:
    depth = common.wait_until(
        lambda: (d := common.queue_depth(bench.app, queue)) >= n and d, 30, f"{n} messages in the queue", 0.05
    )
    if depth != n:
        raise BenchError(f"{what}: {depth} messages in the queue, expected {n}")


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    n = sizes.relay_n
    bench = build(BROKERS["rabbitmq"], run.prefix("rl"))
    bench.outbox.create_tables()
    queue = run.queue("relay")
    try:
        common.purge_queue(bench.app, queue)
        warm_relay(run, bench, queue)
        # Interleaved rounds, the best of each side (as in ``throughput``).
        rounds = []
        for _ in range(sizes.rounds):
            insert_pending(bench, queue, run.key("relay"), n)
            ours_round = relay_rate(bench, queue, n, timeout=max(60.0, n / 50))
            check_depth(bench, queue, n, "relay")
            common.purge_queue(bench.app, queue)
            base_round = celery_publish_rate(bench, queue, run.key("relay"), n)
            check_depth(bench, queue, n, "Celery publish loop")
            common.purge_queue(bench.app, queue)
            rounds.append((ours_round, base_round))
        ours, timer = max((r[0] for r in rounds), key=lambda r: r[0])
        base = max(r[1] for r in rounds)
        confirmed = celery_confirmed_rate(bench, queue, run.key("relay"), n)
        check_depth(bench, queue, n, "Celery publish loop with confirms")
        common.purge_queue(bench.app, queue, delete=True)
    finally:
        common.drop_outbox(bench.outbox)
    claim_rate = timer.rows / timer.seconds if timer.seconds else None
    section.setup.update(
        rows=n,
        broker="rabbitmq",
        batch_size=bench.outbox.settings.batch_size,
        baseline="apply_async loop, one shared producer",
        rounds=f"{sizes.rounds}, interleaved; the best of each side",
    )
    section.metrics += [
        common.Metric(
            "dispatch rate (claim + publish + commit)",
            ours,
            base,
            "msg/s",
            "Celery publish loop",
            Target("ratio_min", 1.0, "≥ 1.0x"),
        ),
        common.Metric(
            "dispatch rate vs a confirmed publish loop", ours, confirmed, "msg/s", "Celery loop, confirm_publish"
        ),
        common.Metric("claim only (Store.claim)", claim_rate, None, "rows/s"),
    ]
    share = timer.seconds / (n / ours) if ours else 0.0
    section.notes.append(
        f"{timer.calls} claims of up to {bench.outbox.settings.batch_size} rows took {share:.0%} of the relay's time; "
        f"the rest is publishing ({1e6 / ours - 1e6 * timer.seconds / n:.0f} µs a message vs "
        f"{1e6 / base:.0f} µs for Celery's loop)"
    )
