"""Section ``push``: what a push costs the caller, vs one ``apply_async`` (RabbitMQ).

- one push per transaction: open a Session, push, commit — N times; mean µs per push; beside
  it the floor of any transactional write: a Session that INSERTs one row of the
  application's own table and commits (a commit waits for the WAL flush, which an
  ``apply_async`` has no equivalent of); the two in alternating blocks, the best block of each counts;
- N pushes inside one transaction (one Session, one commit); mean µs per push;
- Celery: ``plain_noop.apply_async`` N times (the usual call: a producer from the pool each time);
  in alternating blocks with the previous one, the best block of each counts;
- bulk: ``push_many`` of 10 000 commands per call, each call its own transaction.

No relay runs (the NOTIFY trigger still fires); the table is emptied between measurements.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench import common
from bench.app import BenchApp, build
from bench.common import BROKERS, BULK_SIZE, Run, Section, Sizes, Target

#: Alternating blocks of the push and of the app's INSERT, each in its own transaction (see :func:`own_tx_pair`).
OWN_TX_BLOCKS = 6
#: Alternating blocks of N pushes in one transaction and of N ``apply_async`` (see :func:`one_tx_pair`).
ONE_TX_BLOCKS = 3


def truncate(bench: BenchApp) -> None:
    common.pg_exec(f"TRUNCATE {bench.outbox.store.table.name} CASCADE")  # with the attempts that reference it


def push_each_in_own_tx(bench: BenchApp, queue: str, key: str, n: int) -> float:
    """Mean seconds of: Session, push, commit."""
    engine = bench.outbox.engine
    t0 = time.perf_counter()
    for _ in range(n):
        with Session(engine) as session, session.begin():
            bench.noop.options(target=queue).push(session, key)
    return (time.perf_counter() - t0) / n


def app_insert_each_in_own_tx(table: sa.Table, engine: sa.Engine, n: int, first_id: int = 0) -> float:
    """Mean seconds of: Session, INSERT one row of the application's own table (ids from ``first_id``), commit."""
    t0 = time.perf_counter()
    for i in range(first_id, first_id + n):
        with Session(engine) as session, session.begin():
            session.execute(sa.insert(table).values(id=i, email="a@example.com"))
    return (time.perf_counter() - t0) / n


def own_tx_pair(bench: BenchApp, table: sa.Table, queue: str, key: str, n: int) -> tuple[float, float]:
    """(push, the app's INSERT), each in its own transaction: the best mean of ``OWN_TX_BLOCKS`` blocks of each.

    The blocks alternate (push first, then the INSERT first, ...): both sides wait for the
    same WAL flush, and this machine's speed drifts within seconds, which a run of one
    side after the other would charge to whichever ran in the slower stretch.
    """
    size = max(n // OWN_TX_BLOCKS, 1)
    pushes: list[float] = []
    inserts: list[float] = []
    for block in range(OWN_TX_BLOCKS):
        for side in ("push", "insert") if block % 2 == 0 else ("insert", "push"):
            if side == "push":
                pushes.append(push_each_in_own_tx(bench, queue, key, size))
            else:
                inserts.append(app_insert_each_in_own_tx(table, bench.outbox.engine, size, block * size))
    return min(pushes), min(inserts)


def push_all_in_one_tx(bench: BenchApp, queue: str, key: str, n: int) -> float:
    """Mean seconds per push of N pushes in one Session and one commit."""
    engine = bench.outbox.engine
    t0 = time.perf_counter()
    with Session(engine) as session, session.begin():
        for _ in range(n):
            bench.noop.options(target=queue).push(session, key)
    return (time.perf_counter() - t0) / n


def one_tx_pair(bench: BenchApp, queue: str, key: str, n: int) -> tuple[float, float]:
    """(a push among ``n`` in one transaction, one ``apply_async``): the best of ``ONE_TX_BLOCKS`` alternating
    blocks of each, as :func:`own_tx_pair` does (a single block of either read up to a third off, run to run)."""
    pushes: list[float] = []
    applies: list[float] = []
    for block in range(ONE_TX_BLOCKS):
        for side in ("push", "apply") if block % 2 == 0 else ("apply", "push"):
            if side == "push":
                truncate(bench)
                pushes.append(push_all_in_one_tx(bench, queue, key, n))
            else:
                applies.append(apply_async_each(bench, queue, key, n))
    return min(pushes), min(applies)


def apply_async_each(bench: BenchApp, queue: str, key: str, n: int) -> float:
    """Mean seconds of one ``apply_async``."""
    t0 = time.perf_counter()
    for _ in range(n):
        bench.plain_noop.apply_async((key,), queue=queue)
    return (time.perf_counter() - t0) / n


def bulk_rate(bench: BenchApp, queue: str, key: str, calls: int) -> float:
    """Commands per second of ``push_many`` with 10 000 signatures per call, each call committed."""
    engine = bench.outbox.engine
    sigs = [bench.noop.s(key).set(target=queue) for _ in range(BULK_SIZE)]
    t0 = time.perf_counter()
    for _ in range(calls):
        with Session(engine) as session, session.begin():
            bench.outbox.push_many(session, sigs)
    return calls * BULK_SIZE / (time.perf_counter() - t0)


def celery_loop_rate(bench: BenchApp, queue: str, key: str, n: int) -> float:
    """Messages per second of ``apply_async`` in a loop on one shared producer (what a bulk send does in Celery)."""
    with bench.app.producer_or_acquire() as producer:
        t0 = time.perf_counter()
        for _ in range(n):
            bench.plain_noop.apply_async((key,), queue=queue, producer=producer)
        return n / (time.perf_counter() - t0)


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    n = sizes.push_n
    bench = build(BROKERS["rabbitmq"], run.prefix("push"))
    bench.outbox.create_tables()
    app_table = sa.Table(
        f"{run.prefix('push')}orders",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(100), nullable=False),
    )
    app_table.create(bench.outbox.engine)
    queue = run.queue("push")
    key = run.key("push")
    try:
        common.purge_queue(bench.app, queue)
        # warm-up: connections, compiled statements, the producer pool
        push_each_in_own_tx(bench, queue, key, 20)
        apply_async_each(bench, queue, key, 20)
        truncate(bench)
        own_tx, app_tx = own_tx_pair(bench, app_table, queue, key, n)
        one_tx, apply = one_tx_pair(bench, queue, key, n)
        bulk_rate(bench, queue, key, 1)  # warm-up: the COPY path's statement and caches
        truncate(bench)
        bulk = bulk_rate(bench, queue, key, sizes.bulk_calls)
        truncate(bench)
        common.purge_queue(bench.app, queue)
        loop = celery_loop_rate(bench, queue, key, min(n * 5, 10_000))
        common.purge_queue(bench.app, queue, delete=True)
    finally:
        app_table.drop(bench.outbox.engine, checkfirst=True)
        common.drop_outbox(bench.outbox)
    section.setup.update(pushes=n, bulk=f"{sizes.bulk_calls} x push_many({BULK_SIZE})", broker="rabbitmq")
    # The goals: a push in its own transaction costs no more than the application's own INSERT + COMMIT (both wait
    # for the same WAL flush, which an apply_async has no equivalent of: that row is for reading only), and a push
    # among many in one transaction at most a fifth of an apply_async.
    section.metrics += [
        common.Metric("push in its own transaction", own_tx * 1e6, apply * 1e6, "µs", "apply_async", None),
        common.Metric(
            "push in its own transaction vs the app's own INSERT + COMMIT",
            own_tx * 1e6,
            app_tx * 1e6,
            "µs",
            "INSERT + COMMIT",
            Target("ratio_max", 1.0, "≤ 1.0x"),
        ),
        common.Metric(
            "push, N in one transaction",
            one_tx * 1e6,
            apply * 1e6,
            "µs",
            "apply_async",
            Target("ratio_max", 0.2, "≤ 0.2x"),
        ),
        common.Metric(
            "bulk push_many(10 000)",
            bulk,
            loop,
            "cmd/s",
            "apply_async loop, shared producer",
            Target("value_min", 50_000, "≥ 50 000/s"),
        ),
    ]
