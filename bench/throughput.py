"""Section ``throughput``: end-to-end no-op rate, commit → completion recorded.

orch_outbox: N commands pushed with ``outbox.push_many`` in committed batches of 1 000; the
clock starts right before the first batch is pushed and stops when the last row is
``completed`` in the outbox table. The relay is ``orch-outbox -A bench.app:outbox relay``
(the listening relay and the rescuer) in a subprocess of its own; the worker is
``celery -A bench.app worker -Q <queue>``.

Celery: N ``plain_noop.apply_async`` in a loop; the clock runs from the first call until
the worker has run the N-th task. Both handlers do one Redis ``INCR`` (the bench reads it).

procrastinate: the same no-op job, ``batch_defer`` in batches of 1 000, until every job is
``succeeded``; one ``procrastinate worker`` with the threads pool's concurrency.

Each scenario runs ``sizes.throughput_rounds`` times, the two sides interleaved, each first in turn
(ours, Celery, then Celery, ours, ...), and each side's best run counts: on a shared 2-core
machine a run is only ever slowed down by what else happens to run, by 20 % or more, on
either side.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import common, cpu
from bench.app import BenchApp, build
from bench.common import BROKERS, BenchError, Run, Section, Sizes, Target

PUSH_BATCH = 1_000
POOLS = (("prefork", 2), ("threads", 8))
#: Slowest rate a timed wait allows for before it gives up.
MIN_RATE = 20.0


@dataclass
class Timed:
    """One timed run: how many, how long, how fast."""

    n: int
    seconds: float
    #: milliseconds of CPU per command of each process group (see bench/cpu.py)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def wait_budget(n: int) -> float:
    return max(60.0, n / MIN_RATE)


def push_commands(bench: BenchApp, queue: str, key: str, n: int, batch: int = PUSH_BATCH) -> None:
    """Push ``n`` no-op commands to ``queue`` in committed batches."""
    sig = bench.noop.s(key).set(target=queue)
    engine = bench.outbox.engine
    for start in range(0, n, batch):
        with engine.begin() as conn:
            bench.outbox.push_many(conn, [sig] * min(batch, n - start))


def wait_outbox_done(bench: BenchApp, key: str, n: int, watch: list[common.Proc]) -> None:
    """Wait until the handlers ran ``n`` times (Redis counter), then until no row is unfinished."""
    common.wait_until(lambda: common.counter(key) >= n, wait_budget(n), f"{n} commands to run", watch=watch)
    table = bench.outbox.store.table.name
    common.wait_until(lambda: common.count_unfinished(table) == 0, 60, "the last write-backs", 0.005, watch)


NO_OTEL = """import importlib.abc, sys


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(name + " is blocked: the bench runs this process as without the otel extra")


sys.meta_path.insert(0, _Blocked())
"""


def no_otel_dir(run: Run) -> Path:
    """A folder with a ``sitecustomize.py`` that blocks every opentelemetry import (the extra "not installed")."""
    folder = Path(run.log_dir) / "no-otel"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(NO_OTEL)
    return folder


def start_outbox_services(
    run: Run,
    bench: BenchApp,
    broker: str,
    queue: str,
    pool: str,
    concurrency: int,
    tag: str,
    procs: list[common.Proc],
    otel: str = "",
    checkout: Path = common.ROOT,
) -> tuple[common.Proc, common.Proc]:
    """Start the relay and a worker for ``queue``; returns (relay, worker) once a warm-up went through.

    ``otel``: ``"1"`` sets the OpenTelemetry SDK up in both, ``"0"`` switches the outbox's telemetry off.
    ``checkout``: where their ``orch_outbox`` and ``bench.app`` come from (another revision's, see bench/paired.py).
    """
    extra = {"BENCH_OTEL": otel} if otel else {}
    paths = [str(no_otel_dir(run))] if otel == "absent" else []  # a sitecustomize: opentelemetry unimportable
    if checkout != common.ROOT:
        paths.append(str(checkout))
    if paths:
        extra["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = common.subprocess_env(BROKERS[broker], bench.outbox.settings.table_prefix, **extra)
    common.purge_queue(bench.app, queue)
    relay = common.outbox_relay(run, f"{tag}-relay", env, checkout)
    procs.append(relay)
    worker = common.celery_worker(run, f"{tag}-worker", env, queue, pool, concurrency, checkout)
    procs.append(worker)
    return relay, worker


def warm_outbox(run: Run, bench: BenchApp, queue: str, n: int, tag: str, watch: list[common.Proc]) -> None:
    key = run.key(f"{tag}:warm")
    push_commands(bench, queue, key, n)
    common.wait_until(lambda: common.counter(key) >= n, common.START_TIMEOUT, "the warm-up commands", watch=watch)
    table = bench.outbox.store.table.name
    common.wait_until(lambda: common.count_unfinished(table) == 0, 60, "the warm-up write-backs", 0.01, watch)


def outbox_run(
    run: Run,
    bench: BenchApp,
    broker: str,
    pool: str,
    concurrency: int,
    n: int,
    warmup: int,
    tag: str,
    otel: str = "",
    checkout: Path = common.ROOT,
) -> Timed:
    """orch_outbox end to end: push N (batches of 1 000, committed) → last row completed; the relay and the worker
    run from ``checkout``."""
    queue = run.queue(tag)
    # The runs before this one left three dead row versions per command. A production database's autovacuum
    # clears them as it goes; this machine's PostgreSQL runs without autovacuum, so the bench does it here.
    common.pg_exec(f"VACUUM ANALYZE {bench.outbox.store.table.name}")
    with common.processes() as procs:
        relay, worker = start_outbox_services(run, bench, broker, queue, pool, concurrency, tag, procs, otel, checkout)
        warm_outbox(run, bench, queue, warmup, tag, procs)
        key = run.key(tag)
        meter = cpu.CpuMeter({"worker": worker.pid, "relay": relay.pid})
        meter.start()
        t0 = time.perf_counter()
        push_commands(bench, queue, key, n)
        wait_outbox_done(bench, key, n, procs)
        seconds = time.perf_counter() - t0
        spent = meter.stop()
    common.purge_queue(bench.app, queue, delete=True)
    return Timed(n, seconds, cpu.per_command_ms(spent, n))


def celery_run(
    run: Run, bench: BenchApp, broker: str, pool: str, concurrency: int, n: int, warmup: int, tag: str
) -> Timed:
    """Plain Celery end to end: first ``apply_async`` → the N-th task ran."""
    queue = run.queue(tag)
    env = common.subprocess_env(BROKERS[broker], bench.outbox.settings.table_prefix)
    common.purge_queue(bench.app, queue)
    with common.processes() as procs:
        worker = common.celery_worker(run, f"{tag}-worker", env, queue, pool, concurrency)
        procs.append(worker)
        warm = run.key(f"{tag}:warm")
        for _ in range(warmup):
            bench.plain_noop.apply_async((warm,), queue=queue)
        common.wait_until(lambda: common.counter(warm) >= warmup, common.START_TIMEOUT, "warm-up tasks", watch=procs)
        key = run.key(tag)
        meter = cpu.CpuMeter({"worker": worker.pid})
        meter.start()
        t0 = time.perf_counter()
        for _ in range(n):
            bench.plain_noop.apply_async((key,), queue=queue)
        common.wait_until(lambda: common.counter(key) >= n, wait_budget(n), f"{n} tasks to run", watch=procs)
        seconds = time.perf_counter() - t0
        spent = meter.stop()
    common.purge_queue(bench.app, queue, delete=True)
    return Timed(n, seconds, cpu.per_command_ms(spent, n))


def procrastinate_run(run: Run, concurrency: int, n: int, warmup: int) -> Timed:
    """procrastinate end to end: first ``batch_defer`` → every job ``succeeded``."""
    from bench import pc_app

    schema = f"bb{run.id}_pc"
    common.pg_exec(f"CREATE SCHEMA {schema}")
    app, noop = pc_app.build(schema)
    queue = run.queue("pc")
    task = noop.configure(queue=queue)
    try:
        with app.open(), common.processes() as procs:
            app.schema_manager.apply_schema()
            env = common.subprocess_env(None, None, BENCH_PC_SCHEMA=schema)
            argv = [sys.executable, "-m", "procrastinate", "--app=bench.pc_app.app", "--log-level=warning", "worker"]
            argv += ["-c", str(concurrency), "-q", queue]
            procs.append(common.start("pc-worker", argv, env, run))
            warm = run.key("pc:warm")
            task.batch_defer(*[{"key": warm}] * warmup)
            common.wait_until(lambda: common.counter(warm) >= warmup, common.START_TIMEOUT, "warm-up jobs", watch=procs)
            key = run.key("pc")
            t0 = time.perf_counter()
            for start in range(0, n, PUSH_BATCH):
                task.batch_defer(*[{"key": key}] * min(PUSH_BATCH, n - start))
            common.wait_until(lambda: common.counter(key) >= n, wait_budget(n), f"{n} jobs to run", watch=procs)
            sql = f"SELECT count(*) FROM {schema}.procrastinate_jobs WHERE status <> 'succeeded'"
            common.wait_until(lambda: common.pg_poll(sql) == 0, 60, "the last jobs to finish", watch=procs)
            seconds = time.perf_counter() - t0
    finally:
        common.pg_exec(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    return Timed(n, seconds)


#: A threads pool's worker split by thread: the consumer's (the stage every message goes through) and the rest.
THREAD_PARTS = ("worker (main thread)", "worker (other threads)")
#: The smallest CPU per command a ratio is printed against.
MEANINGFUL_MS = 0.01
#: The process groups of the CPU breakdown, in the order printed.
CPU_GROUPS = (
    "worker",
    "worker (main process)",
    "worker (pool processes)",
    "worker (main thread)",
    "worker (other threads)",
    "relay",
    "postgres",
    "rabbitmq",
    "redis",
    "bench",
    "total",
)


def cpu_rows(scenario: str, ours: Timed, base: Timed, groups: tuple[str, ...] = CPU_GROUPS) -> list[common.Metric]:
    """CPU milliseconds per command of each process group, ours beside Celery's (same runs as the rate)."""
    rows = []
    forked = any(t.cpu.get("worker (pool processes)") for t in (ours, base))
    for group in groups:
        value, baseline = ours.cpu.get(group, 0.0), base.cpu.get(group, 0.0)
        if group == "worker (main process)" and not forked:  # a threads pool: all of it is the worker row
            continue
        if group in THREAD_PARTS and forked:  # prefork: the main process is its consumer's thread, near enough
            continue
        if value or baseline:
            name = f"  CPU per command, {scenario}: {group}"
            # Celery's side has no relay and no PostgreSQL work: a few idle ticks there are not a baseline
            rows.append(common.Metric(name, value, baseline, "ms", "Celery", compare=baseline >= MEANINGFUL_MS))
    return rows


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    n, warm = sizes.throughput_n, sizes.warmup
    section.setup.update(
        commands_per_run=n,
        warmup_per_run=warm,
        push_batch=PUSH_BATCH,
        relay="orch-outbox -A bench.app:outbox relay (ListeningRelay subprocess)",
        pools={p: c for p, c in POOLS},
        rounds=f"{sizes.throughput_rounds}, interleaved, each side first in turn; the best of each side",
    )
    rates: dict[str, float] = {}
    for broker in BROKERS:
        bench = build(BROKERS[broker], run.prefix(f"tp{broker[0]}"))
        bench.outbox.create_tables()
        try:
            for pool, conc in POOLS:
                tag = f"tp-{broker}-{pool}"
                runs: list[tuple[Timed, Timed]] = []
                for i in range(sizes.throughput_rounds):
                    # Which side goes first alternates: a run reads differently right after the other side's.
                    order = (("o", outbox_run), ("c", celery_run))[:: -1 if i % 2 else 1]
                    timed = {
                        side: measure(run, bench, broker, pool, conc, n, warm, f"{tag}-{side}{i}")
                        for side, measure in order
                    }
                    runs.append((timed["o"], timed["c"]))
                ours = max((o for o, _ in runs), key=lambda t: t.rate)
                base = max((c for _, c in runs), key=lambda t: t.rate)
                rates[f"{broker}/{pool}"] = ours.rate
                section.metrics.append(
                    common.Metric(
                        f"no-op e2e, {broker}, {pool} -c{conc}",
                        ours.rate,
                        base.rate,
                        "cmd/s",
                        "Celery",
                        Target("ratio_min", 0.8, "≥ 0.8x"),
                    )
                )
                section.metrics.extend(cpu_rows(f"{broker}, {pool}", ours, base))
        finally:
            common.drop_outbox(bench.outbox)
    threads = dict(POOLS)["threads"]
    try:
        pc = max(
            (procrastinate_run(run, threads, sizes.procrastinate_n, warm) for _ in range(sizes.rounds)),
            key=lambda t: t.rate,
        )
    except BenchError as exc:
        section.notes.append(f"procrastinate could not be measured: {exc}")
        return
    ours = rates.get("rabbitmq/threads")
    section.metrics.append(
        common.Metric(
            f"no-op e2e vs procrastinate -c{threads} (ours: rabbitmq, threads)",
            ours,
            pc.rate,
            "cmd/s",
            "procrastinate",
            Target("ratio_min", 3.0, "≥ 3x"),
        )
    )
    section.setup["procrastinate_n"] = pc.n
