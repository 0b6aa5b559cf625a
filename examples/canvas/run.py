"""Durable canvases (docs/workflows.md) run by a real worker and beat: a chain, a chord, a group and a batch per
tenant with a continuation and a member appended while the tenant was paused.

It migrates with ``orch-outbox migrate``, starts ``celery -A orch_outbox worker -Q <queue>`` and
``celery -A orch_outbox beat`` in this folder, pushes every canvas in one transaction of its own,
waits (bounded) until each is final, prints what each step returned and exits 0 only if every
outcome, read back with ``outbox.get`` / ``outbox.batch``, is the expected one.

The embedded default (SQLite and a filesystem broker under ``ORCH_OUTBOX_HOME``, a temp folder
when unset) unless ``ORCH_OUTBOX_DATABASE_URL`` and ``CELERY_BROKER_URL`` name PostgreSQL and a
broker; ``CANVAS_QUEUE`` names the queue (``canvas``).
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
from typing import Any

from celery import chain, chord, group
from sqlalchemy.orm import Session

from orch_outbox import FINAL_STATUSES, CommandInfo, CommandNotFound, default_outbox

HERE = Path(__file__).resolve().parent
#: The longest wait for every canvas to be final, in seconds.
WAIT = 90.0
#: The longest wait for a stopped process to exit before it is killed.
STOP_GRACE = 10.0
TENANT = "acme"
IMAGES = ["a.png", "b.png", "c.png"]


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
                tail = (self.logs / f"{role}.log").read_text(errors="replace").splitlines()[-40:]
                raise RuntimeError(f"{role} exited with {proc.returncode}:\n" + "\n".join(tail))

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
    home = Path(os.environ.setdefault("ORCH_OUTBOX_HOME", tempfile.mkdtemp(prefix="orch-outbox-canvas-")))
    home.mkdir(parents=True, exist_ok=True)
    import workflows  # declaring its commands builds the ready app, from ./celeryconfig.py and the environment

    print(cli("migrate"), end="")
    services = Services(home)
    try:
        services.start("worker", "worker", "-Q", workflows.QUEUE, "--pool", "threads", "--loglevel", "INFO")
        services.start("beat", "beat", "--loglevel", "INFO", "--schedule", str(home / "celerybeat-schedule"))
        pushed = push_canvases()
        outcomes = wait_final(pushed, services)
        ok = outcomes is not None and check(pushed, outcomes)
        if outcomes is not None:
            print(cli("batches", "show", str(pushed["batch"].id)), end="")
    finally:
        services.stop()
    if ok and own_home:
        shutil.rmtree(home, ignore_errors=True)
    elif not ok:
        print(f"the logs are in {home}")
    print("canvas: every canvas completed" if ok else "canvas: FAILED", flush=True)
    return 0 if ok else 1


def push_canvases() -> dict[str, Any]:
    """One transaction with the chain, the chord, the group and a tenant's batch; a second one appends to the
    batch while the tenant is paused (so the batch is certainly still open), then the tenant is resumed."""
    import workflows as w  # imported in main() already, once the environment was set

    outbox = default_outbox()
    outbox.pause(tenant=TENANT)  # the tenant's commands stay pending until resumed
    try:
        with Session(outbox.engine) as session, session.begin():
            steps = chain(w.fetch.s("https://example.com/a"), w.parse.s(), w.count_words.s())
            members = [w.send.s("ada"), w.send.s("grace")]
            pushed: dict[str, Any] = {
                "chain": outbox.push(session, steps),  # the id of its first step
                "chord": outbox.push(session, chord([w.resize.s(i) for i in IMAGES], w.publish.s())),  # a batch id
                "group": outbox.push(session, group(w.resize.s("d.png"), w.resize.s("e.png"))),  # a batch id
                "batch": outbox.push_batch(session, members, tenant=TENANT, then=w.report.s()),  # a BatchRef
            }
        with Session(outbox.engine) as session, session.begin():
            pushed["appended"] = outbox.append_to_batch(session, pushed["batch"].id, [w.send.s("linus")])
    finally:
        outbox.resume(tenant=TENANT)
    print(f"pushed a chain (first step {pushed['chain']}), a chord, a group and batch {pushed['batch'].id}")
    return pushed


def wait_final(pushed: dict[str, Any], services: Services) -> dict[str, Any] | None:
    """Poll until the chain's last step, the chord's body, the group and the batch's continuation are final."""
    deadline = time.monotonic() + WAIT
    while True:
        outcomes = look(pushed)
        if all(v is not None for v in outcomes.values()):
            return outcomes
        if time.monotonic() > deadline:
            print(f"timed out after {WAIT}s; still running: {[k for k, v in outcomes.items() if v is None]}")
            return None
        services.check()
        time.sleep(0.2)


def look(pushed: dict[str, Any]) -> dict[str, Any]:
    """What is final so far (None: not yet)."""
    outbox = default_outbox()
    steps = [outbox.get(pushed["chain"])]
    while steps[-1].status == "completed" and (kids := outbox.children(steps[-1].id)):
        steps.append(kids[0])
    chord_batch = outbox.batch(pushed["chord"])
    batch = outbox.batch(pushed["batch"].id)

    def final(command_id: uuid.UUID | None) -> CommandInfo | None:
        try:
            info = outbox.get(command_id) if command_id is not None else None
        except CommandNotFound:  # a continuation is inserted once its batch is final
            return None
        return info if info is not None and info.status in FINAL_STATUSES else None

    group_batch = outbox.batch(pushed["group"])
    return {
        "chain": steps if len(steps) == 3 and steps[-1].status in FINAL_STATUSES else None,
        "chord": final(chord_batch.continuation_id),
        "group": group_batch if group_batch.status == "finished" else None,
        "batch": final(batch.continuation_id) if batch.status == "finished" else None,
    }


def check(pushed: dict[str, Any], outcomes: dict[str, Any]) -> bool:
    """Print every outcome; True if each is the expected one."""
    outbox = default_outbox()
    steps = outcomes["chain"]
    print("chain: " + " -> ".join(f"{s.name} {s.status} {s.output!r}" for s in steps))
    ok = [(s.name, s.status) for s in steps] == [(n, "completed") for n in ("fetch", "parse", "canvas.count_words")]
    ok &= steps[-1].output == 5

    body = outcomes["chord"]
    print(f"chord: {body.name}({body.input}) {body.status}: {body.output!r}")
    ok &= body.status == "completed" and body.output == "published 3: a@2x.png, b@2x.png, c@2x.png"

    grouped = outcomes["group"]
    members = outbox.batch_members(grouped.id)
    print(f"group: {grouped.kind} {grouped.status}, members {[(m.status, m.output) for m in members]}")
    ok &= sorted(m.output for m in members) == ["d@2x.png", "e@2x.png"] and grouped.counts == {"completed": 2}

    continuation, batch = outcomes["batch"], outbox.batch(pushed["batch"].id)
    print(f"batch of tenant {batch.tenant}: {batch.status}, {batch.done}/{batch.total} final")
    print(f"  then {continuation.name} {continuation.status}: {continuation.output!r}")
    expected = "sent to ada (completed); sent to grace (completed); sent to linus (completed)"
    ok &= batch.tenant == TENANT and continuation.status == "completed" and continuation.output == expected
    print(f"tenant {TENANT}: {outbox.tenant_stats(TENANT)}")
    return bool(ok)


if __name__ == "__main__":
    sys.exit(main())
