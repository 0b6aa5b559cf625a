"""The quick start in one script, on the embedded default (no servers).

It runs what a newcomer types - ``orch-outbox migrate``, ``celery -A orch_outbox worker``,
``celery -A orch_outbox beat`` - in this folder, pushes greetings (one in a transaction that
commits, one in a transaction that rolls back, one with ``delay()``), waits until they are
final, prints them and ``orch-outbox list``, and stops what it started. It exits 0 only if
every greeting and its chained ``shout`` completed with the expected output, read back
with ``outbox.get(id)``, and the rolled-back greeting was never stored.

The SQLite file, the broker folder and the logs live under ``ORCH_OUTBOX_HOME`` (a temp
folder, removed after a successful run, when unset).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy.orm import Session

from orch_outbox import FINAL_STATUSES, CommandInfo, default_outbox

HERE = Path(__file__).resolve().parent
#: The longest wait for the commands to be final, in seconds.
WAIT = 60.0
#: The longest wait for a stopped process to exit before it is killed.
STOP_GRACE = 10.0


class Services:
    """``celery`` subprocesses run in this folder, each in a process group of its own, its output in a log."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str, *args: str) -> None:
        print(f"$ celery -A orch_outbox {' '.join(args)} &   (log: {self.logs / role}.log)")
        with (self.logs / f"{role}.log").open("wb") as log:
            self.procs[role] = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "orch_outbox", *args],
                cwd=HERE,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def check(self) -> None:
        """Raise if one of them exited: nothing would run the commands."""
        for role, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{role} exited with {proc.returncode}:\n{self.tail(role)}")

    def tail(self, role: str, lines: int = 40) -> str:
        return "\n".join((self.logs / f"{role}.log").read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown), a bounded wait, then SIGKILL of each process group."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its group
            proc.wait(timeout=STOP_GRACE)


def cli(*args: str) -> str:
    """Run ``orch-outbox ARGS`` in this folder, as a user would; its output, or raise if it failed."""
    print(f"$ orch-outbox {' '.join(args)}")
    done = subprocess.run(
        [sys.executable, "-m", "orch_outbox.cli", *args], cwd=HERE, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"orch-outbox {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    sys.stderr.write(done.stderr)
    return done.stdout


def main() -> int:
    # SIGTERM (like Ctrl-C) ends the script through its `finally`, which stops the worker and beat.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    os.chdir(HERE)  # the ready app reads ./celeryconfig.py, as `celery -A orch_outbox` does here
    own_home = "ORCH_OUTBOX_HOME" not in os.environ
    home = Path(os.environ.setdefault("ORCH_OUTBOX_HOME", tempfile.mkdtemp(prefix="orch-outbox-quickstart-")))
    home.mkdir(parents=True, exist_ok=True)
    print(cli("migrate"), end="")
    services = Services(home)
    try:
        services.start("worker", "worker", "--pool", "threads", "--concurrency", "2", "--loglevel", "INFO")
        services.start("beat", "beat", "--loglevel", "INFO", "--schedule", str(home / "celerybeat-schedule"))
        ok = push_and_check(services)
        print(cli("list"), end="")
    finally:
        services.stop()
    if ok and own_home:
        shutil.rmtree(home, ignore_errors=True)
    elif not ok:
        print(f"the logs are in {home}")
    print("quickstart: every command completed" if ok else "quickstart: FAILED", flush=True)
    return 0 if ok else 1


def settled(greeting: CommandInfo, chained: list[CommandInfo]) -> bool:
    """A greeting is final, and so is the shout chained from it when it completed (inserted in that transaction)."""
    if greeting.status not in FINAL_STATUSES:
        return False
    return greeting.status != "completed" or (bool(chained) and chained[0].status in FINAL_STATUSES)


def push_and_check(services: Services) -> bool:
    """Push the greetings, wait until every one and its chained shout are final; True if all went as expected."""
    import commands  # declaring its commands builds the ready app, from ./celeryconfig.py and ORCH_OUTBOX_HOME

    outbox = default_outbox()
    with Session(outbox.engine) as session, session.begin():
        ada = commands.greet.push(session, "ada")  # one INSERT in this transaction, which commits
    print(f"pushed greet('ada') {ada} in a transaction that committed")
    with Session(outbox.engine) as session, session.begin():
        commands.greet.push(session, "nobody")
        session.rollback()  # the command never existed
    print("pushed greet('nobody') in a transaction that rolled back")
    grace = uuid.UUID(commands.greet.delay("grace").id)  # a push in a transaction of its own
    print(f"pushed greet('grace') {grace} with delay()")

    expected = {ada: ("hello ada", "HELLO ADA!"), grace: ("hello grace", "HELLO GRACE!")}
    deadline = time.monotonic() + WAIT
    while True:
        greetings = {cid: outbox.get(cid) for cid in expected}
        shouts = {cid: outbox.children(cid) for cid in expected}
        if all(settled(greetings[cid], shouts[cid]) for cid in expected):
            break
        if time.monotonic() > deadline:
            print(f"timed out after {WAIT}s: {[(g.name, g.status) for g in greetings.values()]}")
            return False
        services.check()
        time.sleep(0.2)

    ok = True
    for cid, (greeting, shouted) in expected.items():
        info, kids = greetings[cid], shouts[cid]
        print(f"{info.name}({info.input['name']!r}) {info.status}: {info.output!r}")
        ok &= info.status == "completed" and info.output == greeting
        for kid in kids:
            print(f"  then {kid.name} {kid.status}: {kid.output!r}")
        ok &= [(k.name, k.status, k.output) for k in kids] == [("shout", "completed", shouted)]
    stored = [c.input["name"] for c in outbox.find(name="greet", limit=1000)]
    print(f"greet('nobody') stored: {'nobody' in stored}")
    return ok and "nobody" not in stored


if __name__ == "__main__":
    sys.exit(main())
