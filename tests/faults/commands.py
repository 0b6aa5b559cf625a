"""The commands of the fault-injection project, declared by :func:`declare`.

The same source serves twice: the harness copies it into the project folder, where the
``fault_commands`` module (imported by ``celery -A orch_outbox worker`` / ``beat``
through Celery's ``imports``) declares the commands on the ready app; and the test
process declares the same commands on its own outbox, to push and cancel them.

Every handler records its **side effects** in ``<prefix>effects`` over a connection of
its own (straight to PostgreSQL, never through a proxy and never on the outbox's
connections): a ``start`` row when it begins and a ``done`` row just before it returns.
The ledger counts them to tell how often a handler really ran.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import psycopg

from orch_outbox import CommandCanceled, LeaseLost, current
from orch_outbox.task import Outcome

#: Retries of the commands that do not set their own.
WORK_RETRIES = 2
#: Seconds a `work` handler may run unless a push says otherwise.
WORK_TIMEOUT = 10.0

#: Which child each command's hooks enqueue, by the parent's final status (the ledger's expectations).
CHAINS: dict[str, dict[str, str]] = {
    "work": {"completed": "after_work", "failed": "on_work_failed", "canceled": "on_work_canceled"},
    "poison": {"failed": "on_poison_failed"},
}


def effects_ddl(prefix: str) -> str:
    """The side-effect table of one project."""
    return (
        f"CREATE TABLE IF NOT EXISTS {prefix}effects ("
        " seq bigserial PRIMARY KEY,"
        " command_id uuid NOT NULL,"
        " name text NOT NULL,"
        " attempt integer NOT NULL,"
        " phase text NOT NULL,"
        " pid integer NOT NULL,"
        " host_time double precision NOT NULL,"
        " db_time timestamptz NOT NULL DEFAULT clock_timestamp())"
    )


def declare(command: Callable[..., Any], queue: str, effects_url: str, prefix: str) -> dict[str, Any]:
    """Declare the project's commands with ``command`` (a ``@command`` decorator); returns them by name."""

    def effect(phase: str) -> None:
        ctx = current()
        with psycopg.connect(effects_url, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {prefix}effects (command_id, name, attempt, phase, pid, host_time)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (ctx.id, ctx.name, ctx.attempt, phase, os.getpid(), time.time()),
            )

    def pause(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)

    @command(target=queue, timeout=WORK_TIMEOUT, retries=WORK_RETRIES)
    def work(n: int, seconds: float = 0.0, chain: bool = True, after: float = 0.0) -> dict[str, int]:
        """Records ``start``, runs ``seconds`` (cooperatively: a timeout interrupts it), records ``done``;
        on its first attempt it then lingers ``after`` seconds before returning (a window between the side
        effect and the write-back, for a test to kill the worker in)."""
        effect("start")
        pause(seconds)
        effect("done")
        pause(after if current().attempt == 1 else 0.0)
        return {"n": n, "attempt": current().attempt, "pid": os.getpid()}

    @command(target=queue, retries=WORK_RETRIES)
    def after_work(n: int) -> int:
        """Chained after ``work`` succeeded."""
        effect("done")
        return n

    @command(target=queue, retries=WORK_RETRIES)
    def on_work_failed(n: int) -> int:
        """Chained after ``work`` failed for good."""
        effect("done")
        return n

    @command(target=queue, retries=WORK_RETRIES)
    def on_work_canceled(n: int) -> int:
        """Chained after ``work`` was canceled."""
        effect("done")
        return n

    @command(target=queue, timeout=0.5, retries=2)
    def poison(n: int) -> None:
        """Kills the process running it, every time (a segfaulting C extension, an OOM kill)."""
        effect("start")
        os._exit(3)

    @command(target=queue, timeout=1.0, retries=1)
    def stuck(n: int, seconds: float = 20.0) -> dict[str, int]:
        """On its first attempt blocks in one C call (``time.sleep``) far past its 1 s timeout, which cannot
        interrupt it; later attempts record whether a process of an earlier attempt is still alive."""
        effect("start")
        if current().attempt == 1:
            try:
                time.sleep(seconds)
            finally:  # the timeout arrives once the sleep returns (threads); a killed process never gets here
                effect("done")
        else:
            effect("overlap" if _earlier_alive(effects_url, prefix, current().id) else "alone")
            effect("done")
        return {"n": n, "attempt": current().attempt, "pid": os.getpid()}

    @command(target=queue, retries=WORK_RETRIES)
    def beacon(name: str, argument: Any = None) -> str:
        """A long-running job: records ``start``, then a ``beat`` every 0.25 s (with its process id: the ledger of
        who holds the job) until it is asked to stop, then ``stopped``."""
        effect("start")
        while not current().canceled:
            effect("beat")
            try:
                current().heartbeat()
            except (CommandCanceled, LeaseLost):
                break
            pause(0.25)
        effect("stopped")
        return name

    @command(target=queue, retries=0)
    def on_poison_failed(n: int) -> int:
        """Chained once ``poison`` has failed for good."""
        effect("done")
        return n

    @work.then
    def _work_done(outcome: Outcome) -> list[Any]:
        return [after_work.s(outcome.input["n"])] if outcome.input.get("chain", True) else []

    @work.if_failed
    def _work_failed(outcome: Outcome) -> list[Any]:
        return [on_work_failed.s(outcome.input["n"])]

    @work.if_canceled
    def _work_canceled(outcome: Outcome) -> list[Any]:
        return [on_work_canceled.s(outcome.input["n"])]

    @poison.if_failed
    def _poison_failed(outcome: Outcome) -> list[Any]:
        return [on_poison_failed.s(outcome.input["n"])]

    return {
        "work": work,
        "after_work": after_work,
        "on_work_failed": on_work_failed,
        "on_work_canceled": on_work_canceled,
        "poison": poison,
        "on_poison_failed": on_poison_failed,
        "stuck": stuck,
        "beacon": beacon,
    }


def _earlier_alive(effects_url: str, prefix: str, command_id: Any) -> bool:
    """Whether a process that started an earlier attempt of this command and never finished it still runs."""
    with psycopg.connect(effects_url, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT pid FROM {prefix}effects WHERE command_id = %s AND attempt = 1 AND phase = 'start'"
            f" AND NOT EXISTS (SELECT 1 FROM {prefix}effects d WHERE d.command_id = %s AND d.attempt = 1"
            " AND d.phase = 'done')",
            (command_id, command_id),
        ).fetchall()
    for (pid,) in rows:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return True
        except FileNotFoundError:
            continue
    return False
