"""Shared pieces of the benchmark: servers, run naming, subprocesses, waits, results and tables.

Every wait here is bounded in time (a deadline) and in count (a maximum number of
polls); every subprocess runs in its own process group and is killed with it, on a
normal end, on an error and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.results import (  # re-exported: the sections use them as common.X
    Metric as Metric,
)
from bench.results import (
    Section as Section,
)
from bench.results import (
    Target as Target,
)
from bench.results import (
    fmt as fmt,
)
from bench.results import (
    fmt_met as fmt_met,
)
from bench.results import (
    fmt_ratio as fmt_ratio,
)
from bench.results import (
    section_table as section_table,
)
from bench.results import (
    summary_table as summary_table,
)
from bench.results import (
    table as table,
)
from bench.sizes import (  # re-exported: the sections import them from here
    BULK_SIZE as BULK_SIZE,
)
from bench.sizes import (
    DEFAULT as DEFAULT,
)
from bench.sizes import (
    FULL as FULL,
)
from bench.sizes import (
    QUICK as QUICK,
)
from bench.sizes import (
    Sizes as Sizes,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

DB_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://127.0.0.1/test")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
BROKERS = {"rabbitmq": AMQP_URL, "redis": REDIS_URL}

#: Longest a worker or relay subprocess may take to start and run its warm-up.
START_TIMEOUT = 90.0
#: How long a stopped subprocess gets for its warm shutdown before its group is killed.
STOP_GRACE = 5.0


class BenchError(RuntimeError):
    """A section could not be measured (a server, a subprocess or a wait failed)."""


# -- servers ------------------------------------------------------------------------------


def check_servers() -> dict[str, str | None]:
    """Each server's problem, or None when it answers: ``{"postgresql": None, "redis": "...", ...}``."""
    return {"postgresql": _check_pg(), "redis": _check_redis(), "rabbitmq": _check_amqp()}


def _check_pg() -> str | None:
    import psycopg

    try:
        with psycopg.connect(DB_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {DB_URL} does not answer: {exc}"
    return None


def _check_redis() -> str | None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=3).ping()
    except Exception as exc:
        return f"Redis at {REDIS_URL} does not answer: {exc}"
    return None


def _check_amqp() -> str | None:
    from kombu import Connection

    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        return f"RabbitMQ at {AMQP_URL.replace('guest:guest@', '')} does not answer: {exc}"
    return None


# -- run naming ---------------------------------------------------------------------------


@dataclass
class Run:
    """One invocation of the benchmark: its id, and where its names and logs come from."""

    id: str = field(default_factory=lambda: secrets.token_hex(3))
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="orch-bench-")))
    queues: set[str] = field(default_factory=set)

    def prefix(self, tag: str) -> str:
        """A table prefix unique to this run: ``bb1a2b3c_tp_``."""
        return f"bb{self.id}_{tag}_"

    def queue(self, tag: str) -> str:
        """A Celery queue name unique to this run and scenario."""
        name = f"bench.{self.id}.{tag}"
        self.queues.add(name)
        return name

    def key(self, tag: str) -> str:
        """A Redis key unique to this run (counters, latency lists)."""
        return f"bench:{self.id}:{tag}"


# -- subprocesses -------------------------------------------------------------------------

_LIVE: set[Proc] = set()
#: Every subprocess started in this run, in order (their logs are scanned for errors, see :func:`logged_errors`).
STARTED: list[Proc] = []
#: A line of a process log that reports an error: Celery's and logging's ``ERROR``/``CRITICAL`` records, a traceback.
_ERROR_LINE = re.compile(r"(?:\bERROR\b|\bCRITICAL\b|^Traceback \(most recent call last\))")


@dataclass(eq=False)
class Proc:
    """A subprocess in a process group of its own, with its output in a log file."""

    role: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes]
    #: how it is asked to stop, and for how long before its group is killed. A Celery worker
    #: gets SIGQUIT (cold shutdown) and 1 s: the threads pool's shutdown takes 8-10 s here
    #: with or without orch_outbox, and the measurement is over anyway.
    stop_signal: signal.Signals = signal.SIGTERM
    stop_grace: float = STOP_GRACE

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self) -> None:
        """Raise with the end of its log when the process has exited."""
        if not self.alive():
            raise BenchError(f"{self.role} exited with {self.popen.returncode}; log {self.log}:\n{self.tail()}")

    def stop(self) -> None:
        """Signal the whole group to stop, then SIGKILL it after its grace."""
        stop_group([self])


def _signal_group(proc: Proc, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_group(procs: Sequence[Proc], grace: float | None = None) -> None:
    """Stop several subprocesses at once: signal every group, wait (its grace at most), SIGKILL what is left."""
    now = time.monotonic()
    for proc in procs:
        _LIVE.discard(proc)
        _signal_group(proc, proc.stop_signal)
    for proc in procs:
        deadline = now + (proc.stop_grace if grace is None else min(grace, proc.stop_grace))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
    for proc in procs:  # whatever is left of each group (a stuck leader, prefork children)
        _signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5.0)


def start(role: str, argv: Sequence[str], env: Mapping[str, str], run: Run, cwd: Path = ROOT) -> Proc:
    """Start a subprocess in its own process group, in ``cwd`` (the project root), output to a log file."""
    log = run.log_dir / f"{role}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc = Proc(role, list(argv), log, popen)
    _LIVE.add(proc)
    STARTED.append(proc)
    return proc


def logged_errors(procs: Sequence[Proc]) -> list[str]:
    """One line per log of ``procs`` that reports errors: how many error lines, the first of them, the log."""
    found = []
    for log in dict.fromkeys(proc.log for proc in procs):
        try:
            lines = [line for line in log.read_text(errors="replace").splitlines() if _ERROR_LINE.search(line)]
        except FileNotFoundError:
            continue
        if lines:
            found.append(f"{len(lines)} error line(s) in {log}, the first: {lines[0].strip()[:160]}")
    return found


def stop_all() -> None:
    """Stop every subprocess still running (atexit, signals, errors)."""
    stop_group(list(_LIVE), grace=2.0)


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """A scope whose subprocesses (appended to the yielded list) are stopped at its end."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        stop_group(procs)


def install_cleanup() -> None:
    """Kill the subprocesses on exit, and turn SIGTERM / SIGHUP into KeyboardInterrupt so finally blocks run."""
    atexit.register(stop_all)

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)


def subprocess_env(broker_url: str | None, prefix: str | None, **extra: str) -> dict[str, str]:
    """The environment of a subprocess: the bench app's settings (no app without a prefix), no ambient Celery ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "ORCH_OUTBOX_", "BENCH_"))}
    env.update(PYTHONUNBUFFERED="1", BENCH_DATABASE_URL=DB_URL, BENCH_REDIS_URL=REDIS_URL)
    if broker_url and prefix:
        env.update(BENCH_BROKER=broker_url, BENCH_PREFIX=prefix)
    env.update(extra)
    return env


def celery_worker(
    run: Run, role: str, env: Mapping[str, str], queue: str, pool: str, concurrency: int, cwd: Path = ROOT
) -> Proc:
    """``celery -A bench.app worker`` on one queue (no gossip, mingle or heartbeat: nothing but the work), run in
    ``cwd`` (a checkout: the project root, or another revision's, see bench/paired.py)."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.app",
        "worker",
        "-Q",
        queue,
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-n",
        f"{role}.{run.id}@%h",
        "-l",
        "warning",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    proc = start(role, argv, env, run, cwd)
    proc.stop_signal, proc.stop_grace = signal.SIGQUIT, 1.0
    return proc


def outbox_relay(run: Run, role: str, env: Mapping[str, str], cwd: Path = ROOT) -> Proc:
    """``orch-outbox -A bench.app:outbox relay``: the listening relay and the rescuer, in a process of its own, run
    in ``cwd`` (a checkout)."""
    argv = [sys.executable, "-m", "orch_outbox.cli", "-A", "bench.app:outbox", "relay"]
    return start(role, argv, env, run, cwd)


# -- waiting and timing -------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.02,
    watch: Sequence[Proc] = (),
) -> Any:
    """Poll ``predicate`` until truthy; bounded by ``timeout`` and by a poll count; checks ``watch`` are alive."""
    deadline = time.monotonic() + timeout
    max_polls = int(timeout / interval) + 10
    for _ in range(max_polls):
        value = predicate()
        if value:
            return value
        for proc in watch:
            proc.check()
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


_REDIS: Any = None


def redis_client() -> Any:
    """The bench process's Redis client (one connection pool for the run)."""
    global _REDIS
    if _REDIS is None:
        import redis

        _REDIS = redis.Redis.from_url(REDIS_URL, socket_timeout=30)
    return _REDIS


def counter(key: str) -> int:
    """The value of a Redis counter (0 when missing)."""
    return int(redis_client().get(key) or 0)


# -- the outbox database ------------------------------------------------------------------


def pg_exec(sql: str, *, autocommit: bool = True) -> list[tuple[Any, ...]]:
    """Run one SQL statement on a connection of its own; returns its rows (if any)."""
    import psycopg

    with psycopg.connect(DB_URL, autocommit=autocommit) as conn:
        cur = conn.execute(sql.encode())
        return cur.fetchall() if cur.description else []


_POLL_CONN: Any = None


def pg_poll(sql: str) -> Any:
    """The first value of a read-only query, on one long-lived autocommit connection (cheap to poll with)."""
    global _POLL_CONN
    import psycopg

    if _POLL_CONN is None or _POLL_CONN.closed:
        _POLL_CONN = psycopg.connect(DB_URL, autocommit=True)
    row = _POLL_CONN.execute(sql.encode()).fetchone()
    return None if row is None else row[0]


def count_unfinished(table: str) -> int:
    return int(pg_poll(f"SELECT count(*) FROM {table} WHERE status NOT IN ('completed', 'failed')"))


def drop_outbox(outbox: Any) -> None:
    """Drop an outbox's tables (and its notify function), then release its connections."""
    with contextlib.suppress(Exception):
        outbox.store.drop_all()
    with contextlib.suppress(Exception):
        if hasattr(outbox, "close"):
            outbox.close()
        outbox.engine.dispose()


def purge_queue(app: Any, queue: str, delete: bool = False) -> int:
    """Declare (as Celery would) and purge a queue; optionally delete it. Returns the messages purged."""
    q = app.amqp.queues[queue]
    with app.connection_for_write() as conn:
        bound = q(conn.default_channel)
        bound.declare()
        purged = bound.purge() or 0
        if delete:
            bound.delete()
    return int(purged)


def queue_depth(app: Any, queue: str) -> int:
    """Messages ready in a queue (RabbitMQ: passive declare; Redis: list length)."""
    q = app.amqp.queues[queue]
    with app.connection_for_write() as conn:
        bound = q(conn.default_channel)
        _, count, _ = bound.queue_declare(passive=True)
    return int(count)


def delete_redis_keys(run: Run) -> None:
    """Delete this run's Redis keys (counters, lists, and the Redis broker's queues and bindings)."""
    client = redis_client()
    for pattern in (f"*{run.id}*",):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])


def cleanup_run(run: Run) -> None:
    """The safety net after every section: drop this run's tables, schema, queues and Redis keys."""
    steps: list[tuple[str, Callable[[], None]]] = [
        ("tables", lambda: _drop_run_tables(run)),
        ("rabbitmq queues", lambda: _delete_amqp_queues(run)),
        ("redis keys", lambda: delete_redis_keys(run)),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            print(f"cleanup of {what} failed: {exc}", file=sys.stderr)


def _drop_run_tables(run: Run) -> None:
    like = f"bb{run.id}%"
    tables = pg_exec(f"SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE '{like}'")
    for (name,) in tables:
        pg_exec(f'DROP TABLE IF EXISTS "{name}" CASCADE')
    functions = pg_exec(f"SELECT proname FROM pg_proc WHERE proname LIKE '{like}'")
    for (name,) in functions:
        pg_exec(f'DROP FUNCTION IF EXISTS "{name}"() CASCADE')
    for (name,) in pg_exec(f"SELECT nspname FROM pg_namespace WHERE nspname LIKE '{like}'"):
        pg_exec(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def _delete_amqp_queues(run: Run) -> None:
    from kombu import Connection

    with Connection(AMQP_URL, connect_timeout=5) as conn:
        for name in sorted(run.queues):
            channel = conn.channel()
            try:
                channel.queue_delete(name)
            except Exception:
                pass  # already gone
            finally:
                with contextlib.suppress(Exception):
                    channel.close()


# -- results (bench/results.py) and the host ---------------------------------------------


def host_facts() -> dict[str, Any]:
    """What the figures were taken on."""
    import celery
    import kombu
    import sqlalchemy

    return {
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "postgresql": pg_exec("SHOW server_version")[0][0],
        "synchronous_commit": pg_exec("SHOW synchronous_commit")[0][0],
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
    }
