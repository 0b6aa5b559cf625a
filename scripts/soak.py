"""Soak test: a large backlog drained by real Celery workers that keep getting SIGKILLed.

    .venv/bin/python scripts/soak.py [--commands 100000] [--workers 2] [--kill-every 10]
                                     [--fail-rate 0.05] [--broker amqp|redis] [--timeout-minutes 30]

What it runs, as a user would (see tests/e2e/harness.py for the same set-up in the tests):

1. a temporary project folder with a ``celeryconfig.py`` (short leases, fast retries, a
   unique table prefix) and a ``soak_commands.py`` declaring ``work(n, fail)`` and its
   chained ``after_work`` (on success) and ``after_failure`` (after the last retry); every
   handler INSERTs one row into ``<prefix>effects`` (command id, attempt, name, pid) before
   it returns or raises: the ledger of executions;
2. ``orch-outbox migrate``, N ``celery -A orch_outbox worker --pool prefork -c 2`` and one
   ``celery -A orch_outbox beat`` (listening relay + rescuer), each in its own process
   group with its output in a log file; then ``--commands`` commands pushed in committed
   transactions of 1000, plus 1% pushed in transactions that roll back;
3. while the backlog drains, every ``--kill-every`` seconds a SIGKILL, alternately of a
   worker's main process (its whole process group; a replacement worker is started) and
   of one of its prefork pool processes (Celery forks a new one);
4. once every row is final (or at the deadline), the workers are stopped and the database
   is reconciled against what was pushed and against the effects ledger;
5. clean-up, also on Ctrl-C, SIGTERM or an error: process groups killed, tables dropped,
   the broker queue deleted, the folder removed (``--keep`` keeps tables and folder).

Exit code 0 only if nothing was lost, nothing was recorded twice and no rolled-back
command appeared.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import types
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

BROKERS = {"amqp": "amqp://guest:guest@127.0.0.1:5672//", "redis": "redis://127.0.0.1:6379/10"}
DATABASE_URL = "postgresql://127.0.0.1/test"
FINAL = ("completed", "failed", "canceled", "expired")
#: Commands per committed push transaction.
BATCH = 1000
#: Share of pushes made in transactions that roll back (their ids must never appear).
ROLLBACK_SHARE = 0.01
#: Killing stops once fewer than this share of the pushed commands is unfinished.
STOP_KILLING_BELOW = 0.05
POLL_SECONDS = 1.0
PROGRESS_SECONDS = 15.0
#: Longest wait for a starting worker to log " ready." / beat to start its listening relay.
READY_TIMEOUT = 90.0
#: Longest wait for a process to exit after SIGTERM before its process group is SIGKILLed.
STOP_GRACE = 10.0
#: Offending commands shown in detail (row, effects, log lines) when the reconcile fails.
SHOW_OFFENDERS = 8
LOG_LINES_PER_OFFENDER = 30

CELERYCONFIG = string.Template('''\
"""Celery configuration of the soak project (written by scripts/soak.py)."""

broker_url = $broker_url
outbox_database_url = $database_url
outbox_table_prefix = $prefix
# Short leases and fast retries, so that kills are noticed and settled quickly.
outbox_dispatch_timeout = $dispatch_timeout
outbox_lock_buffer = 2.0
outbox_rescue_interval = 1.0
outbox_poll_interval = 0.5
outbox_default_timeout = 5.0
outbox_default_retries = 3
outbox_retry_backoff = "exponential"
outbox_retry_backoff_base = 0.2
outbox_retry_backoff_max = 2.0
# A short broker queue to go with the short dispatch lease: 100 messages drain in about
# two seconds, so a message rarely waits in the broker past its lease and gets redispatched.
outbox_max_in_flight = 100
imports = ("soak_commands",)
beat_schedule_filename = $schedule
''')

COMMANDS = string.Template('''\
"""Commands of the soak project (written by scripts/soak.py).

Each handler INSERTs its execution into the effects ledger, in its own autocommitted
connection, before it returns or raises; the soak reconciles the outbox against it.
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa

from orch_outbox import command, current
from orch_outbox.task import Outcome

QUEUE = $queue
EFFECTS_URL = $effects_url
EFFECTS_TABLE = $effects_table
#: Of the commands pushed with fail=True, those with n divisible by this always fail.
ALWAYS_FAIL_EVERY = 4
#: The others fail on attempts up to this one, then succeed.
FAIL_UNTIL_ATTEMPT = 2

_engine: sa.Engine | None = None
_engine_pid = 0


def _effects_engine() -> sa.Engine:
    """A small pool per worker process (a prefork child never reuses its parent's connections)."""
    global _engine, _engine_pid
    if _engine is None or _engine_pid != os.getpid():
        _engine = sa.create_engine(EFFECTS_URL, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=2)
        _engine_pid = os.getpid()
    return _engine


def record(name: str) -> None:
    """The side effect: one ledger row per execution of an attempt."""
    ctx = current()
    with _effects_engine().connect() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {EFFECTS_TABLE} (command_id, attempt, name, pid) VALUES (:id, :attempt, :name, :pid)"
            ),
            {"id": ctx.id, "attempt": ctx.attempt, "name": name, "pid": os.getpid()},
        )


def raises(n: int, fail: bool, attempt: int) -> bool:
    """Whether work(n, fail) raises at this attempt, by design."""
    return fail and (n % ALWAYS_FAIL_EVERY == 0 or attempt <= FAIL_UNTIL_ATTEMPT)


@command(target=QUEUE)
def work(n: int, fail: bool) -> int:
    attempt = current().attempt
    record("work")
    if raises(n, fail, attempt):
        raise RuntimeError(f"work({n}) fails by design at attempt {attempt}")
    return n


@command(target=QUEUE)
def after_work(n: int) -> int:
    record("after_work")
    return n


@command(target=QUEUE)
def after_failure(n: int) -> int:
    record("after_failure")
    return n


@work.then
def _after_work(outcome: Outcome) -> list[Any]:
    return [after_work.s(outcome.input["n"])]


@work.if_failed
def _after_failure(outcome: Outcome) -> list[Any]:
    return [after_failure.s(outcome.input["n"])]
''')


class Interrupted(Exception):
    """SIGINT or SIGTERM: stop, clean up, exit non-zero."""


def _on_signal(signum: int, _frame: types.FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def psycopg_url(url: str) -> str:
    """``postgresql://`` with the psycopg 3 driver named (what orch_outbox's make_engine does)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def clean_env() -> dict[str, str]:
    """The environment of a subprocess: no ambient Celery / outbox settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "ORCH_OUTBOX_"))}
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (a prefork worker's pool processes), from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the process exited while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass
class Proc:
    """A long-running subprocess (worker or beat): its own process group, its output in a log file."""

    role: str
    node: str
    log: Path
    popen: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    _ready: bool = False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_has(self, text: str, limit: int = 512 * 1024) -> bool:
        """Whether the head of the log holds ``text`` (start-up lines only: logs grow large)."""
        try:
            with self.log.open("rb") as handle:
                return text.encode() in handle.read(limit)
        except FileNotFoundError:
            return False

    def ready(self) -> bool:
        if not self._ready:
            self._ready = self.log_has(" ready.")
        return self._ready

    def kill_group(self) -> None:
        """SIGKILL the whole process group (main process and pool processes) and reap the main process."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=STOP_GRACE)


@dataclass
class Pushed:
    committed: list[uuid.UUID] = field(default_factory=list)
    rolled_back: list[uuid.UUID] = field(default_factory=list)
    with_fail: int = 0
    seconds: float = 0.0


@dataclass
class Reconciled:
    """The reconcile's findings; ``lines`` is the printed report."""

    lost: int
    double: int
    ghosts: int
    lines: list[str]
    offenders: dict[str, list[uuid.UUID]]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.double == 0 and self.ghosts == 0


class Soak:
    """One soak run: set-up, push, drain under kills, reconcile, clean-up."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        token = uuid.uuid4().hex[:8]
        self.prefix = f"soak_{token}_"
        self.queue = f"soak-{token}"
        self.token = token
        self.broker_url = BROKERS[args.broker]
        self.database_url = args.database_url
        self.root = Path(tempfile.mkdtemp(prefix=f"soak-{token}-"))
        self.started = time.monotonic()
        self.deadline = self.started + args.timeout_minutes * 60
        self.engine = sa.create_engine(psycopg_url(self.database_url), pool_size=2, max_overflow=2)
        self.procs: list[Proc] = []  # every process ever started (logs, clean-up)
        self.workers: list[Proc] = []  # the workers meant to be running now
        self.beat: Proc | None = None
        self.commands: types.ModuleType | None = None
        self.kills: Counter[str] = Counter()
        self.unexpected_exits: list[str] = []
        self.tables_created = False
        self.old_cwd = os.getcwd()

    # -- set-up -------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A progress line, stamped with the seconds since the start."""
        print(f"[{time.monotonic() - self.started:6.0f}s] {text}", flush=True)

    def table(self, name: str) -> str:
        return f"{self.prefix}{name}"  # the prefix is a plain identifier (a-z, 0-9, _)

    def write_project(self) -> None:
        (self.root / "celeryconfig.py").write_text(
            CELERYCONFIG.substitute(
                broker_url=repr(self.broker_url),
                database_url=repr(self.database_url),
                prefix=repr(self.prefix),
                dispatch_timeout=repr(float(self.args.dispatch_timeout)),
                schedule=repr(str(self.root / "celerybeat-schedule")),
            )
        )
        (self.root / "soak_commands.py").write_text(
            COMMANDS.substitute(
                queue=repr(self.queue),
                effects_url=repr(psycopg_url(self.database_url)),
                effects_table=repr(self.table("effects")),
            )
        )

    def migrate(self) -> None:
        cli = Path(sys.executable).with_name("orch-outbox")
        argv = [str(cli), "migrate"] if cli.exists() else [sys.executable, "-m", "orch_outbox.cli", "migrate"]
        self.tables_created = True  # from here on, clean-up drops them (IF EXISTS)
        done = subprocess.run(
            argv, cwd=self.root, env=clean_env(), capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"orch-outbox migrate failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                f"CREATE TABLE {self.table('effects')} (command_id uuid NOT NULL, attempt int NOT NULL, "
                "name text NOT NULL, pid int NOT NULL, recorded_at timestamptz NOT NULL DEFAULT clock_timestamp())"
            )

    def load_commands(self) -> types.ModuleType:
        """Import the project's commands here too (this process is the user's app that pushes).

        The ready app reads ``celeryconfig`` from the current directory, so this process
        moves into the project folder, with no ambient outbox settings in its environment.
        """
        for key in [k for k in os.environ if k.startswith(("CELERY_", "ORCH_OUTBOX_"))]:
            del os.environ[key]
        if "celeryconfig" in sys.modules or "orch_outbox.default" in sys.modules:
            raise RuntimeError("celeryconfig / the ready app were imported before the soak project was set up")
        os.chdir(self.root)
        sys.path.insert(0, str(self.root))
        module = importlib.import_module("soak_commands")
        from orch_outbox import default_outbox

        prefix = default_outbox().settings.table_prefix
        if prefix != self.prefix:
            raise RuntimeError(f"the ready app read the wrong celeryconfig (prefix {prefix!r})")
        return module

    def spawn(self, role: str, argv: list[str], node: str) -> Proc:
        log = self.root / f"{role}-{len(self.procs)}.log"
        with log.open("wb") as handle:
            popen = subprocess.Popen(
                argv,
                cwd=self.root,
                env=clean_env(),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: one killpg takes the pool processes too
            )
        proc = Proc(role, node, log, popen)
        self.procs.append(proc)
        return proc

    def start_worker(self) -> Proc:
        node = f"soak{len(self.procs)}-{self.token}"
        argv = [
            sys.executable, "-m", "celery", "-A", "orch_outbox", "worker", "-Q", self.queue,
            "--pool", "prefork", "-c", "2", "-n", f"{node}@%h", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        proc = self.spawn("worker", argv, node)
        self.workers.append(proc)
        return proc

    def start_beat(self) -> Proc:
        argv = [sys.executable, "-m", "celery", "-A", "orch_outbox", "beat", "--loglevel", "INFO"]
        self.beat = self.spawn("beat", argv, "beat")
        return self.beat

    def wait_ready(self, procs: list[Proc], what: str, text: str | None = None) -> None:
        """Bounded wait for start-up lines in the logs; fails if a process exits meanwhile."""
        until = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < until:
            dead = [p for p in procs if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].role} exited ({dead[0].popen.returncode}) while starting: {dead[0].log}")
            if all((p.log_has(text) if text else p.ready()) for p in procs):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} not ready after {READY_TIMEOUT:.0f}s; see {procs[0].log}")

    # -- push ---------------------------------------------------------------------------

    def push(self) -> Pushed:
        """Committed transactions of BATCH commands; after each, a 1% batch in a transaction that rolls back."""
        assert self.commands is not None
        from orch_outbox import default_outbox

        outbox, work = default_outbox(), self.commands.work
        pushed = Pushed()
        began = time.monotonic()
        total = self.args.commands
        for start in range(0, total, BATCH):
            size = min(BATCH, total - start)
            flags = [self.rng.random() < self.args.fail_rate for _ in range(size)]
            pushed.with_fail += sum(flags)
            with Session(self.engine) as session, session.begin():
                ids = outbox.push_many(session, [work.s(start + i, fail) for i, fail in enumerate(flags)])
            pushed.committed.extend(ids)
            ghosts = max(1, round(size * ROLLBACK_SHARE))
            with Session(self.engine) as session:
                base = len(pushed.rolled_back)
                ids = outbox.push_many(session, [work.s(-(base + i + 1), False) for i in range(ghosts)])
                session.rollback()
            pushed.rolled_back.extend(ids)
            if time.monotonic() > self.deadline:
                self.say(f"deadline reached while pushing: {len(pushed.committed)} of {total} pushed")
                break
        pushed.seconds = time.monotonic() - began
        return pushed

    # -- drain under kills --------------------------------------------------------------

    def status_counts(self) -> Counter[str]:
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(f"SELECT status, count(*) FROM {self.table('commands')} GROUP BY status")
            return Counter({r[0]: int(r[1]) for r in rows})

    def unfinished(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    f"SELECT count(*) FROM {self.table('commands')} "
                    "WHERE status IN ('pending', 'dispatched', 'running')"
                ).scalar_one()
            )

    def kill_one(self) -> str:
        """SIGKILL one worker process: alternately a main process (whole group, replaced) and a pool process."""
        live = [w for w in self.workers if w.alive()]
        if not live:
            return "no live worker to kill"
        victim = self.rng.choice(live)
        want_child = (self.kills["main"] + self.kills["child"]) % 2 == 1
        if want_child:
            pool = children_of(victim.popen.pid)
            if pool:
                pid = self.rng.choice(pool)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.kills["child"] += 1
                return f"SIGKILL pool process {pid} of {victim.node}"
            # a worker still starting has no pool processes yet: kill its main process instead
        victim.kill_group()
        self.workers.remove(victim)
        self.kills["main"] += 1
        new = self.start_worker()
        return f"SIGKILL process group of {victim.node} (pid {victim.popen.pid}); started {new.node}"

    def supervise(self) -> None:
        """Replace a worker or beat that exited although nobody killed it (reported: it should not happen)."""
        for worker in [w for w in self.workers if not w.alive()]:
            self.unexpected_exits.append(f"{worker.node} exited {worker.popen.returncode} ({worker.log.name})")
            self.workers.remove(worker)
            self.start_worker()
        if self.beat is not None and not self.beat.alive():
            self.unexpected_exits.append(f"beat exited {self.beat.popen.returncode} ({self.beat.log.name})")
            self.start_beat()

    def drain(self, total: int) -> tuple[float, bool]:
        """Wait until every row is final, killing workers meanwhile; returns (seconds, drained)."""
        began = time.monotonic()
        next_kill = began + self.args.kill_every if self.args.kill_every > 0 else math.inf
        next_progress = began
        killing = self.args.kill_every > 0
        max_polls = int((self.deadline - began) / POLL_SECONDS) + 10
        for _ in range(max_polls):
            now = time.monotonic()
            left = self.unfinished()
            if left == 0:
                return now - began, True
            if now >= self.deadline:
                self.say(f"deadline reached with {left} unfinished rows")
                return now - began, False
            self.supervise()
            if killing and left < STOP_KILLING_BELOW * total:
                killing = False
                self.say(f"backlog {left} < {STOP_KILLING_BELOW:.0%}: no more kills")
            if killing and now >= next_kill:
                self.say(self.kill_one())
                next_kill = now + self.args.kill_every
            if now >= next_progress:
                self.progress()
                next_progress = now + PROGRESS_SECONDS
            time.sleep(POLL_SECONDS)
        return time.monotonic() - began, False

    def progress(self) -> None:
        counts = self.status_counts()
        final = sum(counts[s] for s in FINAL)
        with self.engine.connect() as conn:
            effects = int(conn.exec_driver_sql(f"SELECT count(*) FROM {self.table('effects')}").scalar_one())
        states = " ".join(f"{s}={counts[s]}" for s in ("pending", "dispatched", "running"))
        self.say(
            f"rows={sum(counts.values())} final={final} {states} effects={effects} queue={self.queue_depth()} "
            f"kills={self.kills['main']}+{self.kills['child']} workers={sum(w.alive() for w in self.workers)}"
        )

    def queue_depth(self) -> int | str:
        """Messages waiting in the broker queue (stale ones included), or '?' when the broker does not say."""
        import kombu

        try:
            with kombu.Connection(self.broker_url, connect_timeout=5) as conn:  # type: ignore[attr-defined,no-untyped-call]
                return int(conn.default_channel.queue_declare(self.queue, passive=True).message_count)
        except Exception:  # only a progress figure
            return "?"

    # -- stop and clean up --------------------------------------------------------------

    def stop_all(self) -> None:
        """SIGTERM every live process, a bounded wait, then SIGKILL of every process group."""
        for proc in self.procs:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
        until = time.monotonic() + STOP_GRACE
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, until - time.monotonic()))
        for proc in self.procs:
            proc.kill_group()  # pool processes left behind by a main process that exited, or a hung one

    def cleanup(self) -> None:
        """Stop processes, drop the tables, delete the queue, remove the folder (each step on its own)."""
        steps = [("stop processes", self.stop_all)]
        if not self.args.keep:
            steps += [("drop tables", self.drop_tables), ("delete queue", self.delete_queue)]
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # clean up as much as possible, then report
                print(f"clean-up: could not {what}: {exc!r}", file=sys.stderr)
        with contextlib.suppress(Exception):
            from orch_outbox import default_outbox

            if self.commands is not None:
                default_outbox().close()
        self.engine.dispose()
        os.chdir(self.old_cwd)
        if self.args.keep:
            print(f"kept: folder {self.root}, tables {self.prefix}*", flush=True)
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def drop_tables(self) -> None:
        if not self.tables_created:
            return
        from orch_outbox import metadata_for

        with self.engine.begin() as conn:
            metadata_for(self.prefix).drop_all(conn)
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {self.table('effects')}")
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {self.table('alembic_version')}")

    def delete_queue(self) -> None:
        import kombu

        with kombu.Connection(self.broker_url, connect_timeout=5) as conn:  # type: ignore[attr-defined,no-untyped-call]
            kombu.Queue(self.queue).bind(conn.default_channel).delete()  # type: ignore[attr-defined,no-untyped-call]

    # -- reconcile ----------------------------------------------------------------------

    def reconcile(self, pushed: Pushed) -> Reconciled:
        """Compare the outbox with what was pushed and with the effects ledger."""
        assert self.commands is not None
        raises = self.commands.raises
        with self.engine.connect() as conn:
            rows = {
                r.id: r
                for r in conn.exec_driver_sql(
                    "SELECT id, name, status, outcome, attempt, retries_left, parent_id, error_type, "
                    f"(input->>'n')::int AS n, coalesce((input->>'fail')::boolean, false) AS fail "
                    f"FROM {self.table('commands')}"
                )
            }
            effects = {
                (r[0], r[1]): (r[2], int(r[3]))
                for r in conn.exec_driver_sql(
                    f"SELECT command_id, attempt, min(name), count(*) FROM {self.table('effects')} GROUP BY 1, 2"
                )
            }
        committed, rolled_back = set(pushed.committed), set(pushed.rolled_back)
        offenders: dict[str, list[uuid.UUID]] = {}

        def note(kind: str, ids: Iterable[uuid.UUID]) -> int:
            found = sorted(set(ids))
            if found:
                offenders[kind] = found
            return len(found)

        # 1. pushed commands present, rolled-back ones absent, every row final
        missing = note("missing", committed - rows.keys())
        ghosts = note("rolled-back but present", rolled_back & rows.keys())
        not_final = note("not final", (i for i, r in rows.items() if r.status not in FINAL))
        works = [r for r in rows.values() if r.name == "work"]

        def expected_row(i: uuid.UUID, r: Any) -> bool:
            if r.name == "work":
                return r.parent_id is None and i in committed
            return r.name in ("after_work", "after_failure") and r.parent_id in committed

        strays = note("unexpected rows", (i for i, r in rows.items() if not expected_row(i, r)))

        # 2. chained children: one after_work per completed work, one after_failure per failed work, none else
        children: Counter[tuple[uuid.UUID, str]] = Counter(
            (r.parent_id, r.name) for r in rows.values() if r.parent_id is not None
        )
        expected = {"completed": "after_work", "failed": "after_failure"}
        missing_child, extra_child, wrong_child = [], [], []
        for w in works:
            want = expected.get(w.status)
            for kind in ("after_work", "after_failure"):
                have = children[(w.id, kind)]
                if kind == want and have == 0:
                    missing_child.append(w.id)
                elif kind == want and have > 1:
                    extra_child.append(w.id)
                elif kind != want and have:
                    wrong_child.append(w.id)
        n_missing_child = note("final work without its chained child", missing_child)
        n_extra_child = note("work with duplicate chained children", extra_child)
        n_wrong_child = note("work with a child of the wrong kind", wrong_child)

        # 3. the effects ledger
        double_exec = note("one attempt executed twice", (cid for (cid, _a), (_n, c) in effects.items() if c > 1))
        no_effect = note(
            "completed without an execution of its attempt",
            (i for i, r in rows.items() if r.status == "completed" and (i, r.attempt) not in effects),
        )
        phantom = note("executions of commands not in the table", (cid for cid, _a in effects if cid not in rows))
        beyond = note(
            "executions of attempts never claimed",
            (cid for cid, a in effects if cid in rows and a > rows[cid].attempt),
        )
        redone: Counter[str] = Counter()  # executions meant to succeed whose success was not the one recorded
        designed_failures = 0
        for (cid, attempt), (name, count) in effects.items():
            row = rows.get(cid)
            if row is None:
                continue
            if name == "work" and raises(row.n, row.fail, attempt):
                designed_failures += count
                continue
            recorded = row.status == "completed" and row.attempt == attempt
            redone[name] += count - (1 if recorded else 0)

        lost = missing + not_final + n_missing_child + no_effect
        double = double_exec + n_extra_child + n_wrong_child
        ghost_total = ghosts + phantom + beyond + strays

        # the report
        by_state = Counter((r.name, r.status, r.outcome) for r in rows.values())
        attempts = Counter(r.attempt for r in works)
        work_fail_lost = sum(1 for r in works if r.status == "failed" and not r.fail)
        always = sum(1 for r in works if r.fail and r.n % self.commands.ALWAYS_FAIL_EVERY == 0)
        lines = [
            "",
            "=" * 78,
            f"SOAK REPORT  broker={self.args.broker} workers={self.args.workers} kill_every={self.args.kill_every}s "
            f"fail_rate={self.args.fail_rate} dispatch_timeout={self.args.dispatch_timeout}s seed={self.args.seed}",
            "-" * 78,
            f"pushed: {len(committed)} committed work commands ({pushed.with_fail} with fail=True, {always} of them "
            f"always failing), {len(rolled_back)} rolled back; push took {pushed.seconds:.1f}s",
            f"  committed present: {len(committed) - missing}/{len(committed)}   rolled-back present: {ghosts}",
            f"rows in the outbox: {len(rows)}   not final: {not_final}",
            "final states (name, status, outcome): count",
            *(f"  {name:<14} {status:<10} {outcome or '-':<9} {count}" for (name, status, outcome), count in
              sorted(by_state.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or ""))),
            "work attempts (final attempt number: commands): "
            + ", ".join(f"{a}: {c}" for a, c in sorted(attempts.items())),
            f"work with fail=False that ended failed (lost leases used up its retries): {work_fail_lost}",
            "chained children: "
            f"after_work={sum(c for (_p, k), c in children.items() if k == 'after_work')} "
            f"after_failure={sum(c for (_p, k), c in children.items() if k == 'after_failure')}; "
            f"missing={n_missing_child} duplicate={n_extra_child} wrong kind={n_wrong_child}",
            f"effects ledger: {sum(c for _n, c in effects.values())} executions of {len(effects)} attempts; "
            f"{designed_failures} failed by design",
            f"  one attempt executed more than once: {double_exec}",
            f"  completed without an execution of the completed attempt: {no_effect}",
            f"  re-executions (work redone after a kill, at-least-once, allowed): {sum(redone.values())} "
            + str({k: v for k, v in redone.items() if v} or ""),
            f"  executions of commands not in the table: {phantom}; of attempts never claimed: {beyond}",
            f"  unexpected rows (parent / name mismatch): {strays}",
        ]  # fmt: skip
        lines += [
            "-" * 78,
            f"LOST = {lost}  (missing {missing} + not final {not_final} + missing child {n_missing_child} "
            f"+ completed without effect {no_effect})",
            f"DOUBLE-RECORDED = {double}  (attempt executed twice {double_exec} + duplicate children "
            f"{n_extra_child} + wrong-kind children {n_wrong_child})",
            f"GHOSTS = {ghost_total}  (rolled back present {ghosts} + unknown executions {phantom + beyond} "
            f"+ unexpected rows {strays})",
        ]
        return Reconciled(lost, double, ghost_total, lines, offenders)

    # -- logs ---------------------------------------------------------------------------

    def log_stats(self) -> list[str]:
        """What the workers and beat logged: stale drops, fenced write-backs, lost pool processes, errors."""
        patterns = {
            "stale messages dropped": "not dispatched to this attempt",
            "fenced write-backs": "outcome not recorded",
            "pool processes lost": "WorkerLostError",
            "tracebacks": "Traceback (most recent call last)",
            "database unavailable": "outbox database unavailable",
        }
        counts: Counter[str] = Counter()
        settled = 0
        for proc in self.procs:
            with contextlib.suppress(FileNotFoundError), proc.log.open(errors="replace") as handle:
                for line in handle:
                    for label, text in patterns.items():
                        if text in line:
                            counts[label] += 1
                    if "rescuer: settled" in line:
                        match = re.search(r"settled (\d+)", line)
                        settled += int(match.group(1)) if match else 0
        found = ", ".join(f"{label}={counts[label]}" for label in patterns)
        return [f"logs: {found}, leases settled by rescuer={settled}"]

    def evidence(self, result: Reconciled) -> list[str]:
        """Rows, effects and log lines of a few offending commands."""
        ids: list[uuid.UUID] = []
        for found in result.offenders.values():
            ids += [i for i in found[:SHOW_OFFENDERS] if i not in ids]
            if len(ids) >= SHOW_OFFENDERS:
                break
        wanted: dict[str, list[str]] = {str(i): [] for i in ids[:SHOW_OFFENDERS]}
        for proc in self.procs:
            with contextlib.suppress(FileNotFoundError), proc.log.open(errors="replace") as handle:
                for line in handle:
                    for key, matched in wanted.items():
                        if key in line and len(matched) < LOG_LINES_PER_OFFENDER:
                            matched.append(f"    {proc.log.name}: {line.rstrip()[:400]}")
        lines = ["", "OFFENDERS"]
        for kind, found in result.offenders.items():
            lines.append(f"  {kind}: {len(found)}: {', '.join(str(i) for i in found[:SHOW_OFFENDERS])}")
        with self.engine.connect() as conn:
            for key, log_lines in wanted.items():
                row = conn.exec_driver_sql(
                    "SELECT id, name, status, outcome, attempt, retries_left, parent_id, worker, error_type, "
                    "error_message, created_at, dispatched_at, started_at, finished_at, lease_expires_at, input "
                    f"FROM {self.table('commands')} WHERE id = %(id)s OR parent_id = %(id)s",
                    {"id": uuid.UUID(key)},
                ).all()
                eff = conn.exec_driver_sql(
                    f"SELECT attempt, name, pid, recorded_at FROM {self.table('effects')} "
                    "WHERE command_id = %(id)s ORDER BY recorded_at",
                    {"id": uuid.UUID(key)},
                ).all()
                lines.append(f"  -- {key}")
                lines += [f"    row: {json.dumps(dict(r._mapping), default=str)}" for r in row]
                lines += [f"    effect: {json.dumps(dict(e._mapping), default=str)}" for e in eff]
                lines += log_lines
        return lines

    # -- the run ------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        print(
            f"soak: {args.commands} commands, {args.workers} workers, kill every {args.kill_every}s, "
            f"fail rate {args.fail_rate}, broker {args.broker}, timeout {args.timeout_minutes} min, "
            f"seed {args.seed}, folder {self.root}, prefix {self.prefix}, queue {self.queue}",
            flush=True,
        )
        self.write_project()
        self.migrate()
        self.commands = self.load_commands()
        workers = [self.start_worker() for _ in range(args.workers)]
        self.wait_ready(workers, "workers")
        beat = self.start_beat()
        self.wait_ready([beat], "beat", "listening relay started")
        self.say(f"{len(workers)} workers and beat ready; pushing")

        began = time.monotonic()
        pushed = self.push()
        self.say(
            f"pushed {len(pushed.committed)} committed "
            f"({len(pushed.committed) / max(pushed.seconds, 1e-9):.0f}/s), {len(pushed.rolled_back)} rolled back"
        )
        drain_seconds, drained = self.drain(len(pushed.committed))
        wall = time.monotonic() - began
        self.say(f"{'drained' if drained else 'NOT drained'}; stopping")
        self.stop_all()  # quiescent before the reconcile: no execution can land after it

        result = self.reconcile(pushed)
        counts = self.status_counts()
        lines = result.lines
        rows = sum(counts.values())
        lines += [
            f"throughput: {len(pushed.committed) / wall:.0f} work commands/s, {rows / wall:.0f} rows/s "
            f"(push start to drained, {wall:.1f}s; drain {drain_seconds:.1f}s)",
            f"kills: {self.kills['main'] + self.kills['child']} (main process groups {self.kills['main']}, "
            f"pool processes {self.kills['child']}); unexpected exits: {len(self.unexpected_exits)}"
            + "".join(f"; {e}" for e in self.unexpected_exits),
            *self.log_stats(),
            f"wall time: {time.monotonic() - self.started:.1f}s",
            "RESULT: " + ("PASS" if result.ok else "FAIL"),
            "=" * 78,
        ]
        print("\n".join(lines), flush=True)
        if not result.ok:
            print("\n".join(self.evidence(result)), flush=True)
        return 0 if result.ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--commands", type=int, default=100_000, help="work commands to push (committed)")
    parser.add_argument("--workers", type=int, default=2, help="celery workers (prefork, 2 processes each)")
    parser.add_argument("--kill-every", type=float, default=10.0, help="seconds between SIGKILLs (0: no kills)")
    parser.add_argument("--fail-rate", type=float, default=0.05, help="share of commands pushed with fail=True")
    parser.add_argument("--broker", choices=sorted(BROKERS), default="amqp")
    parser.add_argument("--timeout-minutes", type=float, default=30.0, help="deadline of the whole run")
    parser.add_argument("--database-url", default=DATABASE_URL)
    parser.add_argument(
        "--dispatch-timeout", type=float, default=10.0, help="outbox_dispatch_timeout: seconds before a redispatch"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the tables and the folder (logs) for inspection")
    args = parser.parse_args(argv)
    if args.commands < 1 or args.workers < 1 or args.kill_every < 0 or not 0 <= args.fail_rate <= 1:
        parser.error("--commands and --workers must be >= 1, --kill-every >= 0, --fail-rate in 0..1")
    if args.dispatch_timeout <= 0 or args.timeout_minutes <= 0:
        parser.error("--dispatch-timeout and --timeout-minutes must be > 0")
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    return args


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted (so that clean-up runs); ignored during clean-up."""
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soak: Soak | None = None
    code = 2
    try:
        with signals_raise():
            soak = Soak(args)
            try:
                code = soak.run()
            except Interrupted as exc:
                print(f"\ninterrupted ({exc}); cleaning up", file=sys.stderr, flush=True)
                code = 130
            except Exception:
                import traceback

                traceback.print_exc()
                code = 2
    finally:
        if soak is not None:
            soak.cleanup()  # signals are ignored here: a second Ctrl-C cannot leave processes behind
    return code


if __name__ == "__main__":
    sys.exit(main())
