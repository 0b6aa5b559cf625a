"""Fault-injection harness: a user's project run by real ``celery`` subprocesses, plus the test's own outbox.

Like ``tests/e2e/harness.py`` (both build on ``tests/support``: processes, waits, rows), a
:class:`FaultProject` is a temporary folder holding what a user's project holds —
``celeryconfig.py`` (short leases: dispatch lease 3 s, lock buffer 1 s, rescue every
0.5 s, poll every 0.2 s, fixed backoff 0.1 s) and ``fault_commands.py`` (the commands of
``commands.py``, declared on the ready app) — and runs ``celery -A orch_outbox worker``
and ``celery -A orch_outbox beat`` in it as subprocesses, each in its own process group
with its output in a log file.

Each process can be pointed at a :class:`~.proxy.Proxy` instead of the real PostgreSQL
or broker (environment ``ORCH_OUTBOX_DATABASE_URL`` / ``CELERY_BROKER_URL``), and each
connects to PostgreSQL under its own ``application_name`` so that a test can
``pg_terminate_backend`` exactly one process's connections.

The test process has an outbox of its own on the same table (``project.outbox``, the same
commands declared on a Celery app of its own): it pushes (in committed and in
rolled-back transactions, remembering both for the ledger), cancels, and — where a
scenario needs precise control — claims, publishes and rescues by hand.

Every wait polls the database or a log with a bounded timeout; teardown kills every
process group (SIGKILL), prints the rows, effects and logs (pytest shows them for a
failed test), drops the tables and deletes the queue.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from celery.canvas import Signature
from sqlalchemy.orm import Session

from orch_outbox import Outbox
from orch_outbox.store import Store, make_engine

from .commands import declare, effects_ddl
from .ledger import Ledger, check_ledger
from .templates import FAULT_COMMANDS, PUSH_SCRIPT, RELAY_CRASH, SKEW_SITECUSTOMIZE
from conftest import make_app, unique_prefix
from support.broker import delete_queue, queue_depth
from support.procs import EXIT_WAIT, Proc, beat_argv, clean_env, json_line, python, run_command, tail, worker_argv
from support.project import ProcessProject

__all__ = [
    "BASE_CONFIG",
    "EXIT_WAIT",
    "FAULT_COMMANDS",
    "PUSH_SCRIPT",
    "RELAY_CRASH",
    "SKEW_SITECUSTOMIZE",
    "STEADY_DISPATCH",
    "WAIT",
    "FaultProject",
    "Proc",
    "broker_with_port",
    "clean_env",
    "delete_queue",
    "json_line",
    "python",
    "tail",
    "with_endpoint",
]

#: The longest any single wait of a fault scenario may take.
WAIT = 40.0
#: Settings of every fault project (short leases so that rescues happen within seconds).
BASE_CONFIG: dict[str, Any] = {
    "outbox_poll_interval": 0.2,
    "outbox_rescue_interval": 0.5,
    "outbox_lock_buffer": 1.0,
    "outbox_dispatch_timeout": 3.0,
    "outbox_retry_backoff": "fixed",
    "outbox_retry_backoff_base": 0.1,
    "worker_prefetch_multiplier": 1,
}

#: For scenarios where the dispatch lease plays no part: a message waiting longer than the 3 s lease (a CPU-starved
#: worker on a loaded machine) would be redispatched — correct, but it would hide what the scenario counts
#: (e.g. "dispatched exactly once": with this lease, a second dispatch can only come from a double claim).
STEADY_DISPATCH: dict[str, Any] = {"outbox_dispatch_timeout": 30.0}

# -- small helpers (the shared ones come from tests/support) ---------------------------------


def with_endpoint(url: str, port: int | None = None, application_name: str | None = None, **query: str) -> str:
    """``url`` pointed at 127.0.0.1:``port`` (a proxy) and/or tagged with an ``application_name``."""
    parsed = sa.engine.make_url(url)
    if port is not None:
        parsed = parsed.set(host="127.0.0.1", port=port)
    extra = dict(query)
    if application_name is not None:
        extra["application_name"] = application_name
    if extra:
        parsed = parsed.update_query_dict(extra)
    return parsed.render_as_string(hide_password=False)


def broker_with_port(url: str, port: int) -> str:
    """A broker URL pointed at 127.0.0.1:``port`` (a proxy)."""
    scheme, rest = url.split("://", 1)
    userinfo, _, hostpath = rest.rpartition("@")
    _, _, path = hostpath.partition("/")
    return f"{scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{port}/{path}"


# -- the project ---------------------------------------------------------------------------


@dataclass
class FaultProject(ProcessProject):
    """A user's project folder, the processes running it, and the test's own outbox on its table.

    Spawning, ``row``/``rows`` and the waits (``wait_for``, ``wait_status``, ``wait_drained``,
    ``wait_ready``) come from :class:`support.project.ProcessProject`; a wait watches every process
    not stopped or killed on purpose.
    """

    wait_timeout = WAIT

    root: Path
    broker_url: str
    pg_url: str
    token: str
    prefix: str
    queue: str
    config: dict[str, Any]
    procs: list[Proc] = field(default_factory=list)
    committed: list[uuid.UUID] = field(default_factory=list)
    rolled_back: list[uuid.UUID] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _cmd: SimpleNamespace | None = None

    @classmethod
    def create(cls, root: Path, broker_url: str, pg_url: str, **config: Any) -> FaultProject:
        token = uuid.uuid4().hex[:8]
        project = cls(
            root=root,
            broker_url=broker_url,
            pg_url=pg_url,
            token=token,
            prefix=f"{unique_prefix()}flt_",
            queue=f"faults-{token}",
            config={**BASE_CONFIG, **config},
        )
        project.write_files()
        project.create_tables()
        return project

    # -- files and tables -----------------------------------------------------------------

    @property
    def effects_url(self) -> str:
        """Where handlers record side effects: straight to PostgreSQL, a connection of their own."""
        url = sa.engine.make_url(with_endpoint(self.pg_url, application_name=f"fe-{self.token}"))
        return url.set(drivername="postgresql").render_as_string(hide_password=False)

    def db_url(self, role: str, port: int | None = None) -> str:
        """The outbox database URL of one process: its own application_name, maybe through a proxy."""
        return with_endpoint(self.pg_url, port, application_name=f"{role}-{self.token}")

    def write_files(self) -> None:
        lines = ['"""Celery configuration of a fault-injection project."""', ""]
        settings = {
            "broker_url": self.broker_url,
            "outbox_database_url": self.db_url("cli"),
            "outbox_table_prefix": self.prefix,
            "imports": ("fault_commands",),
            "beat_schedule_filename": str(self.root / "celerybeat-schedule"),
            **self.config,
        }
        lines += [f"{key} = {value!r}" for key, value in settings.items()]
        (self.root / "celeryconfig.py").write_text("\n".join(lines) + "\n")
        impl = Path(__file__).with_name("commands.py").read_text()
        (self.root / "fault_commands_impl.py").write_text(impl.replace("from .commands", "from fault_commands_impl"))
        (self.root / "fault_commands.py").write_text(
            FAULT_COMMANDS.format(queue=self.queue, effects_url=self.effects_url, prefix=self.prefix)
        )
        (self.root / "relay_crash.py").write_text(RELAY_CRASH)
        (self.root / "push.py").write_text(PUSH_SCRIPT)

    @cached_property
    def engine(self) -> sa.Engine:
        """The test's own engine (straight to PostgreSQL, application_name ``ft-<token>``)."""
        return make_engine(self.db_url("ft"), pool_size=3, max_overflow=5)

    @property
    def store(self) -> Store:
        return self.outbox.store

    @cached_property
    def outbox(self) -> Outbox:
        """The test's own outbox on the project's table (pushes, cancels, hand-made relays)."""
        app = make_app(self.broker_url, name=f"faults-test-{self.token}")
        outbox = Outbox(
            app,
            self.engine,
            table_prefix=self.prefix,
            dispatch_timeout=self.config["outbox_dispatch_timeout"],
            lock_buffer=self.config["outbox_lock_buffer"],
            retry_backoff="fixed",
            retry_backoff_base=self.config["outbox_retry_backoff_base"],
            poll_interval=self.config["outbox_poll_interval"],
            rescue_interval=self.config["outbox_rescue_interval"],
        )
        # Declared at once: the test's rescuer runs the chaining hooks of the commands it settles.
        self._cmd = SimpleNamespace(**declare(outbox.command, self.queue, self.effects_url, self.prefix))
        return outbox

    @property
    def cmd(self) -> SimpleNamespace:
        """The project's commands, declared on the test's outbox (``project.cmd.work.s(1)``)."""
        if self._cmd is None:
            _ = self.outbox
        assert self._cmd is not None
        return self._cmd

    def create_tables(self) -> None:
        self.store.create_all()
        with self.engine.begin() as conn:
            conn.exec_driver_sql(effects_ddl(self.prefix))

    # -- pushing --------------------------------------------------------------------------

    def push(self, calls: Sequence[Signature], rollback: Sequence[Signature] = ()) -> list[uuid.UUID]:
        """Push ``calls`` in one committed transaction and ``rollback`` in one that rolls back; returns the ids."""
        with Session(self.engine) as session, session.begin():
            ids = self.outbox.push_many(session, calls)
        self.committed += ids
        if rollback:
            with Session(self.engine) as session:
                self.rolled_back += self.outbox.push_many(session, rollback)
                session.rollback()
        return ids

    def insert_raw(self, **values: Any) -> uuid.UUID:
        """A row written into the table by hand (plain SQL, bypassing push and its checks)."""
        cid = uuid.uuid4()
        row = {
            "id": cid,
            "status": "pending",
            "priority": 0,
            "attempt": 0,
            "retries": 1,
            "retries_left": 1,
            "timeout": 5.0,
            "input": {},
            "target": self.queue,
            **values,
        }
        table = self.store.table
        with self.engine.begin() as conn:
            now = conn.execute(sa.select(sa.func.now())).scalar_one()
            conn.execute(sa.insert(table).values(created_at=now, scheduled_at=now, **row))
        self.committed.append(cid)
        return cid

    # -- processes ------------------------------------------------------------------------

    def node(self, index: int) -> str:
        return f"fw{index}-{self.token}"

    def start_worker(
        self,
        pool: str = "threads",
        concurrency: int = 2,
        *,
        db_port: int | None = None,
        broker_port: int | None = None,
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
        index: int | None = None,
    ) -> Proc:
        """``celery -A orch_outbox worker -Q <queue>``; its PostgreSQL application_name is its node name.

        ``index``: the worker's number (its node name ``fw<index>-<token>``); by default the next one, and the
        number of an earlier worker restarts that worker under its name.
        """
        if index is None:
            index = sum(p.role.startswith("worker") for p in self.procs)
        node = self.node(index)
        argv = worker_argv(self.queue, node, pool, concurrency)
        proc_env = {"ORCH_OUTBOX_DATABASE_URL": with_endpoint(self.pg_url, db_port, application_name=node)}
        if broker_port is not None:
            proc_env["CELERY_BROKER_URL"] = broker_with_port(self.broker_url, broker_port)
        proc_env.update(env or {})
        restarts = sum(p.role.startswith(f"worker{index}") for p in self.procs)
        role = f"worker{index}" + (f"-run{restarts + 1}" if restarts else "")
        proc = self.spawn(role, argv, proc_env, ready_text=" ready.")
        if wait_ready:
            self.wait_ready()
        return proc

    def start_beat(
        self,
        *,
        schedule: str = "celerybeat-schedule",
        db_port: int | None = None,
        broker_port: int | None = None,
        wait_ready: bool = True,
    ) -> Proc:
        """``celery -A orch_outbox beat``: the listening relay and the rescuer, in-process."""
        index = sum(p.role.startswith("beat") for p in self.procs)
        argv = beat_argv("-s", str(self.root / schedule))
        env = {"ORCH_OUTBOX_DATABASE_URL": self.db_url(f"fb{index}", db_port)}
        if broker_port is not None:
            env["CELERY_BROKER_URL"] = broker_with_port(self.broker_url, broker_port)
        proc = self.spawn(f"beat{index}", argv, env, ready_text="listening relay started")
        if wait_ready:
            self.wait_ready()
        return proc

    def run(
        self,
        argv: list[str],
        timeout: float = WAIT,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a script to completion in the project folder; its output is kept for the report."""
        return run_command(argv, self.root, timeout, env=clean_env(env), transcripts=self.notes)

    def relay_round(self) -> None:
        """One relay and one rescue by the test's own outbox (``wait_drained(relay=True)``: no beat running)."""
        self.outbox.relay_once()
        self.outbox.rescue_once()

    def terminate_backends(self, application_name: str) -> int:
        """pg_terminate_backend of every connection of one process (by application_name); returns how many."""
        with self.engine.connect() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = :name AND pid <> pg_backend_pid()"
                ),
                {"name": application_name},
            ).scalar_one()
            conn.commit()
        return int(killed)

    # -- reading --------------------------------------------------------------------------

    def effects(self, phase: str | None = None, command_id: uuid.UUID | None = None) -> list[dict[str, Any]]:
        where, params = [], {}
        if phase is not None:
            where.append("phase = :phase")
            params["phase"] = phase
        if command_id is not None:
            where.append("command_id = :cid")
            params["cid"] = command_id
        sql = f"SELECT * FROM {self.prefix}effects {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq"
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]

    def db_now(self) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.now())).scalar_one()

    def queue_depth(self) -> int:
        """Messages waiting in the command queue (0 if it does not exist)."""
        return queue_depth(self.broker_url, self.queue)

    def ledger(self, at_least_once: Iterable[uuid.UUID] = ()) -> Ledger:
        """Check the ledger (see ledger.py) over everything this test pushed; fails with the report."""
        try:
            return check_ledger(self.engine, self.prefix, self.committed, self.rolled_back, at_least_once=at_least_once)
        except AssertionError as exc:
            raise AssertionError(f"{exc}{self.report()}") from None

    def log_lines(self, proc: Proc, *needles: str) -> list[str]:
        """The lines of a process's log that contain every needle."""
        return proc.lines(*needles)

    # -- teardown -------------------------------------------------------------------------

    def report(self) -> str:
        """The table, the effects and every log, for failure messages."""
        out = ["", f"--- outbox rows ({self.prefix}commands) ---"]
        try:
            for r in self.rows():
                out.append(
                    f"  {r['id']} {r['name']} {r['status']} attempt={r['attempt']} "
                    f"left={r['retries_left']} outcome={r['outcome']} parent={r['parent_id']} "
                    f"error={r['error_type']}: {(r['error_message'] or '')[:160]}"
                )
            out.append("--- effects ---")
            for e in self.effects():
                out.append(f"  {e['command_id']} {e['name']} attempt={e['attempt']} {e['phase']} pid={e['pid']}")
        except Exception as exc:  # the report must never hide the original failure
            out.append(f"  (could not read the tables: {exc})")
        out += self.logs_report()
        for note in self.notes:
            out.append(tail(note, 40))
        return "\n".join(out)

    def close(self) -> None:
        """Kill every process group, print the report, drop the tables and the queue."""
        for proc in self.procs:
            proc.kill()
        print(self.report())
        try:
            if "outbox" in self.__dict__ and "relay" in self.outbox.__dict__:
                self.outbox.relay.close()
            with self.engine.begin() as conn:
                self.store.metadata.drop_all(conn)
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {self.prefix}effects")
        finally:
            self.engine.dispose()
            delete_queue(self.broker_url, self.queue)
