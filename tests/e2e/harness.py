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
:func:`support.waiting.wait_until` (bounded in time and count); nothing sleeps blindly.

The process helpers (:class:`Proc`, ``clean_env``, ``python``, ``tail``, ``free_port``, ...)
live in ``tests/support`` (one copy for e2e, faults and the soak) and are re-exported here.
"""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from orch_outbox.store import Store, make_engine

from support.broker import delete_queue
from support.procs import (
    STOP_GRACE,
    Proc,
    beat_argv,
    celery_argv,
    clean_env,
    free_port,
    json_line,
    orch_outbox_cli,
    python,
    run_command,
    tail,
    worker_argv,
)
from support.project import ProcessProject

__all__ = [
    "CLI_TIMEOUT",
    "COMMANDS_MODULE",
    "PUSH_SCRIPT",
    "STOP_GRACE",
    "WAIT",
    "Broker",
    "Proc",
    "Project",
    "assert_only_queue",
    "clean_env",
    "delete_queue",
    "free_port",
    "orch_outbox_cli",
    "python",
    "tail",
]

#: The longest any single wait in the e2e slice may take.
WAIT = 60.0
#: The longest a CLI subprocess (migrate, show, status, push, inspect) may take.
CLI_TIMEOUT = 60.0


@dataclass(frozen=True)
class Broker:
    """A broker a test runs on; ``url`` None means the embedded default (filesystem broker)."""

    name: str
    url: str | None
    host: str | None = None
    port: int | None = None


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
class Project(ProcessProject):
    """A user's project folder with its config, commands, and the processes running it.

    Spawning, ``row``/``rows`` and the waits (``wait_for``, ``wait_status``, ``wait_drained``,
    ``wait_ready``) come from :class:`support.project.ProcessProject`.
    """

    wait_timeout = WAIT

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
            done = run_command(argv, self.root, timeout, transcripts=self.cli_log)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{argv} did not finish within {timeout}s{self.report()}") from None
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
        return self.run(celery_argv(*args), timeout=timeout, check=check)

    def migrate(self) -> str:
        return self.cli("migrate").stdout

    def push(self) -> dict[str, str]:
        """Run push.py (the user's web process); returns the ids it printed."""
        done = self.run([python(), "push.py", self.database_url])
        return json_line(done.stdout)  # type: ignore[no-any-return]

    def show(self, command_id: str, check: bool = True) -> dict[str, Any]:
        done = self.cli("show", command_id, "--json", check=check)
        return json.loads(done.stdout) if done.returncode == 0 else {"exit": done.returncode, "stderr": done.stderr}

    def status(self) -> dict[str, dict[str, int]]:
        return json.loads(self.cli("status", "--json").stdout)  # type: ignore[no-any-return]

    # -- long-running processes ---------------------------------------------------------

    def worker_argv(self, pool: str = "threads", concurrency: int = 2) -> list[str]:
        return worker_argv(self.queue, self.node, pool, concurrency)

    def start_worker(self, pool: str = "threads", concurrency: int = 2) -> Proc:
        """``celery -A orch_outbox worker -Q <queue>`` on the command queue only; waits until ready."""
        argv = self.worker_argv(pool, concurrency)
        assert_only_queue(argv, self.queue)
        proc = self.spawn("worker", argv, ready_text=" ready.")
        self.wait_for(proc.ready, f"worker {self.node} to be ready", procs=[proc])
        return proc

    def start_beat(self) -> Proc:
        """``celery -A orch_outbox beat``: runs the relay and the rescuer in-process."""
        return self.spawn("beat", beat_argv())

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
        out += self.logs_report()
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
