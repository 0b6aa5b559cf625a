"""Soak test: a large backlog drained by real Celery workers that keep getting SIGKILLed.

    .venv/bin/python scripts/soak.py [--commands 100000] [--workers 2] [--kill-every 10]
                                     [--fail-rate 0.05] [--broker amqp|redis] [--timeout-minutes 30]

What it runs, as a user would (see tests/e2e/harness.py for the same set-up in the tests; the
process helpers are the tests' own, from tests/support, and the reconcile is in soak_reconcile.py):

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
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import types
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

# The repository root, for tests.support (run as `python scripts/soak.py`, only scripts/ is on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa
from soak_project import CELERYCONFIG, COMMANDS, psycopg_url
from soak_reconcile import Pushed, evidence, log_stats, reconcile
from sqlalchemy.orm import Session

from tests.support.broker import delete_queue, queue_depth
from tests.support.procs import (
    STOP_GRACE,
    Proc,
    beat_argv,
    clean_env,
    orch_outbox_cli,
    run_command,
    spawn,
    stop_all,
    wait_ready,
    worker_argv,
)
from tests.support.project import FINAL

BROKERS = {"amqp": "amqp://guest:guest@127.0.0.1:5672//", "redis": "redis://127.0.0.1:6379/10"}
DATABASE_URL = "postgresql://127.0.0.1/test"
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
#: Subprocesses get no ambient Celery / outbox setting at all (not even the test suite's ORCH_OUTBOX_TEST_*).
KEEP_ENV: tuple[str, ...] = ()


class Interrupted(Exception):
    """SIGINT or SIGTERM: stop, clean up, exit non-zero."""


def _on_signal(signum: int, _frame: types.FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


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
        self.tables_created = True  # from here on, clean-up drops them (IF EXISTS)
        done = run_command([*orch_outbox_cli(), "migrate"], self.root, 120, env=clean_env(keep=KEEP_ENV))
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

    def start_worker(self) -> Proc:
        node = f"soak{len(self.procs)}-{self.token}"
        proc = self.spawn("worker", worker_argv(self.queue, node, "prefork", 2), node, " ready.")
        self.workers.append(proc)
        return proc

    def start_beat(self) -> Proc:
        self.beat = self.spawn("beat", beat_argv(), "beat", "listening relay started")
        return self.beat

    def spawn(self, role: str, argv: list[str], node: str, ready_text: str) -> Proc:
        """A process in its own group (one killpg takes its pool processes too), its output in a log file."""
        log = self.root / f"{role}-{len(self.procs)}.log"
        proc = spawn(role, argv, self.root, log, env=clean_env(keep=KEEP_ENV), ready_text=ready_text, node=node)
        self.procs.append(proc)
        return proc

    def wait_ready(self, procs: list[Proc], what: str) -> None:
        """Bounded wait for the start-up line of each (its ready_text); fails if a process exits meanwhile."""
        logs = ", ".join(str(p.log) for p in procs)
        wait_ready(procs, READY_TIMEOUT, f"{what} to be ready", 0.2, lambda: f"; see {logs}")

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
            pool = victim.children()
            if pool:
                pid = self.rng.choice(pool)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.kills["child"] += 1
                return f"SIGKILL pool process {pid} of {victim.node}"
            # a worker still starting has no pool processes yet: kill its main process instead
        victim.kill()
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
        try:
            return queue_depth(self.broker_url, self.queue, missing_ok=False)
        except Exception:  # only a progress figure
            return "?"

    # -- stop and clean up --------------------------------------------------------------

    def stop_all(self) -> None:
        """SIGTERM every live process, a bounded wait, then SIGKILL of every process group."""
        stop_all(self.procs, STOP_GRACE)

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
        delete_queue(self.broker_url, self.queue, quiet=False)

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
        self.wait_ready([beat], "beat")
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

        assert self.commands is not None
        result = reconcile(self.engine, self.prefix, pushed, self.commands, self.args)
        counts = self.status_counts()
        lines = result.lines
        rows = sum(counts.values())
        lines += [
            f"throughput: {len(pushed.committed) / wall:.0f} work commands/s, {rows / wall:.0f} rows/s "
            f"(push start to drained, {wall:.1f}s; drain {drain_seconds:.1f}s)",
            f"kills: {self.kills['main'] + self.kills['child']} (main process groups {self.kills['main']}, "
            f"pool processes {self.kills['child']}); unexpected exits: {len(self.unexpected_exits)}"
            + "".join(f"; {e}" for e in self.unexpected_exits),
            *log_stats(self.procs),
            f"wall time: {time.monotonic() - self.started:.1f}s",
            "RESULT: " + ("PASS" if result.ok else "FAIL"),
            "=" * 78,
        ]
        print("\n".join(lines), flush=True)
        if not result.ok:
            print("\n".join(evidence(self.engine, self.prefix, self.procs, result)), flush=True)
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
