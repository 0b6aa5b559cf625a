"""End-to-end harness: run orch_outbox exactly as a user does, in real subprocesses.

A :class:`Project` is a temporary folder holding what a user's project holds:

- ``celeryconfig.py`` — the broker, the outbox database and the ``outbox_*`` settings;
- ``e2e_commands.py`` — commands declared with ``from orch_outbox import command``,
  imported by the worker through Celery's ``imports`` setting;
- ``push.py`` — the user's web process: opens its own SQLAlchemy session on the same
  database, pushes commands, commits (and pushes once more in a transaction that rolls
  back), and prints the ids as JSON.

The tables are created with ``orch-outbox migrate``; ``celery -A orch_outbox worker``
and ``celery -A orch_outbox beat`` run as subprocesses in that folder with their output
in log files there. Every process is stopped in :meth:`Project.close` (SIGTERM, then
SIGKILL of its whole process group after a bounded wait), and the logs are printed so
that pytest shows them when the test failed. Waits poll the database with
:func:`orch_outbox.testing.wait_until`; nothing sleeps blindly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from orch_outbox.store import Store, make_engine
from orch_outbox.testing import wait_until

#: The longest any single wait in the e2e slice may take.
WAIT = 60.0
#: The longest a CLI subprocess (migrate, show, status, push, inspect) may take.
CLI_TIMEOUT = 60.0
#: How long a stopped process gets for its warm shutdown before it is killed.
STOP_GRACE = 10.0


@dataclass(frozen=True)
class Broker:
    """A broker a test runs on; ``url`` None means the embedded default (filesystem broker)."""

    name: str
    url: str | None
    host: str | None = None
    port: int | None = None


def python() -> str:
    """The interpreter of the virtualenv the tests run in."""
    return sys.executable


def orch_outbox_cli() -> list[str]:
    """The ``orch-outbox`` console script installed next to the interpreter."""
    script = Path(sys.executable).with_name("orch-outbox")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "orch_outbox.cli"]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess: no ambient Celery / outbox settings leak in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CELERY_", "ORCH_OUTBOX_")) or key.startswith("ORCH_OUTBOX_TEST_")
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONPATH", None)
    env.update(extra or {})
    return env


COMMANDS_MODULE = '''\
"""Commands of the e2e project, declared on the ready app."""

from __future__ import annotations

import time
from dataclasses import dataclass

from orch_outbox import command, current
from orch_outbox.task import Outcome

QUEUE = {queue!r}


@dataclass
class Email:
    to: str
    subject: str


@dataclass
class Sent:
    to: str
    message_id: str
    attempt: int


@command(target=QUEUE, retries=1)
def send_email(email: Email) -> Sent:
    """Succeeds: typed dataclass input and output."""
    assert isinstance(email, Email), type(email)
    return Sent(email.to, f"msg-{{email.to}}-{{email.subject}}", current().attempt)


@command(target=QUEUE)
def record_delivery(sent: Sent) -> str:
    """Chained after send_email; receives its typed output."""
    assert isinstance(sent, Sent), type(sent)
    return f"delivered {{sent.message_id}} to {{sent.to}}"


@send_email.then
def _record(outcome: Outcome) -> list[object]:
    return [record_delivery.s(outcome.output)]


@command(target=QUEUE, retries=2)
def import_feed(url: str) -> int:
    """Always fails: three attempts, then failed."""
    raise ValueError(f"{{url}} is not a valid feed (attempt {{current().attempt}})")


@command(target=QUEUE, retries=0)
def alert_ops(message: str) -> str:
    """Chained when import_feed has failed for good."""
    return f"paged on-call: {{message}}"


@import_feed.if_failed
def _page(outcome: Outcome) -> list[object]:
    assert outcome.error is not None
    return [alert_ops.s(f"import_feed failed: {{outcome.error.type}}")]


@command(target=QUEUE, retries=1)
def flaky(label: str) -> str:
    """Fails its first attempt, succeeds on the retry."""
    if current().attempt == 1:
        raise ConnectionError(f"{{label}}: the first attempt fails")
    return f"{{label}} done on attempt {{current().attempt}}"


@command(target=QUEUE, timeout=30, retries=0)
def slow(seconds: float) -> float:
    """Runs for a while (cooperatively), then succeeds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return seconds
'''


PUSH_SCRIPT = '''\
"""The user's web process: push commands inside its own SQLAlchemy transactions."""

import json
import sys

import sqlalchemy as sa
from sqlalchemy.orm import Session

import e2e_commands as c

engine = sa.create_engine(sys.argv[1])
ids = {}
with Session(engine) as session:
    ids["send_email"] = str(c.send_email.push(session, c.Email("ada@example.com", "welcome")))
    ids["import_feed"] = str(c.import_feed.push(session, "https://example.invalid/feed.xml"))
    session.commit()
with Session(engine) as session:
    ids["ghost"] = str(c.send_email.push(session, c.Email("ghost@example.com", "never")))
    session.rollback()  # this command must never exist
engine.dispose()
print(json.dumps(ids))
'''


@dataclass
class Proc:
    """A long-running subprocess (worker or beat) with its output in a log file."""

    role: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes]

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        """SIGTERM (warm shutdown), then SIGKILL of the whole process group after a bounded wait."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=STOP_GRACE)
        # Whatever is left of the group (prefork children, a hung main process) is killed.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=STOP_GRACE)


@dataclass
class Project:
    """A user's project folder with its config, commands, and the processes running it."""

    root: Path
    broker: Broker
    pg_url: str
    prefix: str
    queue: str
    node: str
    procs: list[Proc] = field(default_factory=list)
    cli_log: list[str] = field(default_factory=list)
    _engine: sa.Engine | None = None

    @classmethod
    def create(cls, root: Path, broker: Broker, pg_url: str, prefix: str) -> Project:
        token = uuid.uuid4().hex[:10]
        project = cls(
            root=root, broker=broker, pg_url=pg_url, prefix=prefix, queue=f"email-worker-{token}", node=f"w1-{token}"
        )
        project.write_files()
        return project

    # -- files --------------------------------------------------------------------------

    @property
    def embedded(self) -> bool:
        return self.broker.url is None

    @property
    def database_url(self) -> str:
        """The database the project uses (the embedded default puts a SQLite file in ``outbox_home``)."""
        if self.embedded:
            return f"sqlite:///{self.root / 'outbox.sqlite3'}"
        return self.pg_url

    def write_files(self) -> None:
        lines = ['"""Celery configuration of the e2e project (what a user writes)."""', ""]
        if self.embedded:
            # The embedded default: no broker, no database URL; both live under outbox_home.
            lines.append(f"outbox_home = {str(self.root)!r}")
        else:
            lines.append(f"broker_url = {self.broker.url!r}")
            lines.append(f"outbox_database_url = {self.pg_url!r}")
        lines += [
            f"outbox_table_prefix = {self.prefix!r}",
            "outbox_poll_interval = 0.2",
            "outbox_rescue_interval = 0.5",
            "outbox_lock_buffer = 5.0",
            "outbox_dispatch_timeout = 15.0",
            'outbox_retry_backoff = "fixed"',
            "outbox_retry_backoff_base = 0.2",
            'imports = ("e2e_commands",)',
            f"beat_schedule_filename = {str(self.root / 'celerybeat-schedule')!r}",
            "worker_prefetch_multiplier = 1",
            "",
        ]
        (self.root / "celeryconfig.py").write_text("\n".join(lines))
        (self.root / "e2e_commands.py").write_text(COMMANDS_MODULE.format(queue=self.queue))
        (self.root / "push.py").write_text(PUSH_SCRIPT)

    # -- one-shot commands --------------------------------------------------------------

    def run(
        self, argv: list[str], timeout: float = CLI_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in the project folder; its output is kept for the failure report."""
        try:
            done = subprocess.run(
                argv, cwd=self.root, env=clean_env(), capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            self.cli_log.append(f"$ {' '.join(argv)}\nTIMED OUT after {timeout}s\n{exc.stdout or ''}{exc.stderr or ''}")
            raise AssertionError(f"{argv} did not finish within {timeout}s{self.report()}") from None
        self.cli_log.append(f"$ {' '.join(argv)}\n[exit {done.returncode}]\n{done.stdout}{done.stderr}")
        if check and done.returncode != 0:
            raise AssertionError(
                f"{argv} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}{self.report()}"
            )
        return done

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``orch-outbox ARGS`` in the project folder (the ready app, configured from celeryconfig)."""
        return self.run([*orch_outbox_cli(), *args], timeout=timeout, check=check)

    def celery(self, *args: str, timeout: float = CLI_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``python -m celery -A orch_outbox ARGS`` in the project folder."""
        return self.run([python(), "-m", "celery", "-A", "orch_outbox", *args], timeout=timeout, check=check)

    def migrate(self) -> str:
        return self.cli("migrate").stdout

    def push(self) -> dict[str, str]:
        """Run push.py (the user's web process); returns the ids it printed."""
        done = self.run([python(), "push.py", self.database_url])
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def show(self, command_id: str, check: bool = True) -> dict[str, Any]:
        done = self.cli("show", command_id, "--json", check=check)
        return json.loads(done.stdout) if done.returncode == 0 else {"exit": done.returncode, "stderr": done.stderr}

    def status(self) -> dict[str, dict[str, int]]:
        return json.loads(self.cli("status", "--json").stdout)  # type: ignore[no-any-return]

    # -- long-running processes ---------------------------------------------------------

    def spawn(self, role: str, argv: list[str]) -> Proc:
        log = self.root / f"{role}-{len(self.procs)}.log"
        handle = log.open("wb")
        try:
            popen = subprocess.Popen(
                argv,
                cwd=self.root,
                env=clean_env(),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            handle.close()
        proc = Proc(role, argv, log, popen)
        self.procs.append(proc)
        return proc

    def worker_argv(self, pool: str = "threads", concurrency: int = 2) -> list[str]:
        return [
            python(),
            "-m",
            "celery",
            "-A",
            "orch_outbox",
            "worker",
            "-Q",
            self.queue,
            "--pool",
            pool,
            "-c",
            str(concurrency),
            "--without-mingle",
            "--without-gossip",
            "-n",
            f"{self.node}@%h",
            "--loglevel",
            "INFO",
        ]

    def start_worker(self, pool: str = "threads", concurrency: int = 2) -> Proc:
        """``celery -A orch_outbox worker -Q <queue>`` on the command queue only; waits until ready."""
        argv = self.worker_argv(pool, concurrency)
        assert_only_queue(argv, self.queue)
        proc = self.spawn("worker", argv)
        self.wait_for(lambda: " ready." in proc.output(), f"worker {self.node} to be ready", procs=[proc])
        return proc

    def start_beat(self) -> Proc:
        """``celery -A orch_outbox beat``: runs the relay and the rescuer in-process."""
        return self.spawn("beat", [python(), "-m", "celery", "-A", "orch_outbox", "beat", "--loglevel", "INFO"])

    @property
    def node_name(self) -> str:
        """The worker's full node name (``-n w1-<token>@%h``)."""
        return f"{self.node}@{socket.gethostname()}"

    # -- database -----------------------------------------------------------------------

    @property
    def store(self) -> Store:
        if self._engine is None:
            self._engine = make_engine(self.database_url)
        return Store(self._engine, self.prefix)

    def row(self, command_id: str) -> dict[str, Any] | None:
        found = self.store.get(uuid.UUID(command_id))
        return dict(found) if found is not None else None

    def rows(self) -> list[dict[str, Any]]:
        table = self.store.table
        with self.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(table.c.created_at))]

    def wait_for(
        self, predicate: Callable[[], Any], what: str, timeout: float = WAIT, procs: list[Proc] | None = None
    ) -> Any:
        """Poll ``predicate`` (bounded); fail early if a process died, with the logs in the message."""
        watched = self.procs if procs is None else procs

        def check() -> Any:
            dead = [p for p in watched if not p.alive()]
            if dead:
                raise AssertionError(
                    f"{', '.join(p.role for p in dead)} exited ({[p.popen.returncode for p in dead]}) "
                    f"while waiting for {what}{self.report()}"
                )
            return predicate()

        try:
            return wait_until(check, timeout=timeout, interval=0.1, what=what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}{self.report()}") from None

    def wait_status(self, command_id: str, *statuses: str, timeout: float = WAIT) -> dict[str, Any]:
        """Wait until a command's row is in one of ``statuses``; returns the row."""

        def reached() -> dict[str, Any] | None:
            row = self.row(command_id)
            return row if row is not None and row["status"] in statuses else None

        return self.wait_for(reached, f"command {command_id} to reach {statuses}", timeout)  # type: ignore[no-any-return]

    def wait_drained(self, expected_rows: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        """Wait until the table holds ``expected_rows`` rows, all final."""

        def drained() -> list[dict[str, Any]] | None:
            rows = self.rows()
            final = ("completed", "failed", "canceled", "expired")
            return rows if len(rows) == expected_rows and all(r["status"] in final for r in rows) else None

        return self.wait_for(drained, f"{expected_rows} final rows", timeout)  # type: ignore[no-any-return]

    # -- teardown -----------------------------------------------------------------------

    def report(self) -> str:
        """The state of the table and every log, for failure messages."""
        parts = []
        try:
            for r in self.rows():
                parts.append(
                    f"  {r['id']} {r['name']} {r['status']} attempt={r['attempt']} "
                    f"outcome={r['outcome']} error={r['error_type']}: {r['error_message']}"
                )
        except Exception as exc:  # the report must never hide the original failure
            parts.append(f"  (could not read the table: {exc})")
        out = ["", "--- outbox rows ---", *parts]
        for proc in self.procs:
            out.append(f"--- {proc.role} ({' '.join(proc.argv)}) exit={proc.popen.poll()} ---")
            out.append(tail(proc.output()))
        if self.cli_log:
            out.append("--- CLI calls ---")
            out.extend(tail(entry, 40) for entry in self.cli_log)
        return "\n".join(out)

    def close(self) -> None:
        """Stop every process (even after a failure), print the logs, drop the tables and the queue."""
        for proc in reversed(self.procs):
            proc.stop()
        # Printed during teardown: pytest shows it only for a failed test.
        print(self.report())
        try:
            if not self.embedded:
                with self.store.engine.begin() as conn:
                    self.store.metadata.drop_all(conn)
                    conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{self.prefix}alembic_version"')
        finally:
            if self._engine is not None:
                self._engine.dispose()
            if not self.embedded:
                delete_queue(self.broker.url or "", self.queue)


def assert_only_queue(argv: list[str], queue: str) -> None:
    """The worker consumes the command queue, exactly, and runs no embedded beat: worker + beat are all it needs."""
    assert argv.count("-Q") == 1 and argv[argv.index("-Q") + 1] == queue, argv
    assert not any(a in ("-B", "--beat") or a.startswith("--queues") for a in argv), argv


def delete_queue(url: str, queue: str) -> None:
    """Remove a test's queue from a shared broker (best effort)."""
    from kombu import Connection, Queue

    with contextlib.suppress(Exception), Connection(url, connect_timeout=5) as conn:
        Queue(queue).bind(conn.default_channel).delete()


def tail(text: str, lines: int = 120) -> str:
    parts = text.splitlines()
    return "\n".join(parts[-lines:]) if len(parts) > lines else text


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
