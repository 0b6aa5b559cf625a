"""End to end: durable workflows (chord, chain through a plain Celery task, batch with a continuation),
pause/resume and cron schedules, run by a real ``celery -A orch_outbox worker`` (threads pool) and a real
``celery -A orch_outbox beat`` on RabbitMQ, with the outcome read from the outbox tables. See ``harness.py``.

The project's commands module (``e2e_commands.py``, imported by the worker through ``imports``) declares
outbox commands with ``orch_outbox.command`` and one plain Celery task with ``@app.task`` on the ready app
(``from orch_outbox import app``). Everything is pushed the way a user's web process does it: a script in the
project folder (``workflows.py``) opens its own SQLAlchemy session, pushes and commits, and prints the ids.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from .harness import Broker, Project, delete_queue, python
from conftest import AMQP_URL, PG_URL, require, unique_prefix

pytestmark = pytest.mark.e2e

#: Longest single wait here: the whole file must stay well under a minute.
STEP_WAIT = 30.0
#: Beat checks schedules every ``outbox_schedule_interval`` (1 s by default): an overdue one fires well within this.
SCHEDULE_WAIT = 15.0
SCHEDULE = "every-minute"

COMMANDS = '''\
"""Workflow commands of the e2e project: outbox commands and one plain Celery task."""

from __future__ import annotations

from typing import Any

from orch_outbox import app, command

QUEUE = {queue!r}
PAUSED = {paused!r}


@command(target=QUEUE, retries=0)
def square(n: int) -> int:
    return n * n


@command(target=QUEUE, retries=0)
def total(values: list[int]) -> int:
    """A chord's body: receives the list of the members' outputs."""
    return sum(values)


@app.task(name="add_ten", queue=QUEUE)
def add_ten(n: int) -> int:
    """A plain Celery task (not an outbox command), run through the outbox inside a chain."""
    return n + 10


@command(target=QUEUE, retries=0)
def describe(n: int) -> str:
    return f"got {{n}}"


@command(target=QUEUE, retries=0)
def ping(n: int) -> int:
    return n + 1


@command(target=QUEUE, retries=0)
def report(outcomes: list[dict[str, Any]]) -> str:
    """A batch continuation: receives the members' outcomes in push order."""
    return ",".join(f"{{o['name']}}:{{o['status']}}:{{o['output']}}" for o in outcomes)


@command(target=QUEUE, retries=0)
def tick(label: str) -> str:
    """Pushed by a cron schedule."""
    return f"tick {{label}}"
'''

WORKFLOWS_SCRIPT = '''\
"""The user's process: push canvases, pause/resume, schedules; prints what it did as JSON."""

import datetime as dt
import json
import sys

import sqlalchemy as sa
from celery import chain, chord
from sqlalchemy.orm import Session

import orch_outbox
import e2e_commands as c

engine = sa.create_engine(sys.argv[1])
outbox = orch_outbox.default_outbox()
out = {{}}
for action in sys.argv[2:]:
    if action == "canvases":
        with Session(engine) as session:
            body = chord([c.square.s(1), c.square.s(2), c.square.s(3)], c.total.s())
            out["chord"] = str(orch_outbox.push(session, body))
            out["chain"] = str(orch_outbox.push(session, chain(c.square.s(4), c.add_ten.s(), c.describe.s())))
            ref = orch_outbox.push_batch(session, [c.ping.s(10), c.ping.s(20)], tenant="acme", then=c.report.s())
            out["batch"] = str(ref.id)
            out["members"] = [str(i) for i in ref.member_ids]
            out["continuation"] = str(ref.continuation_id)
            session.commit()
    elif action == "pause":
        out["paused"] = outbox.pause(target=c.PAUSED)
    elif action == "push_held":
        with Session(engine) as session:
            out["held"] = str(c.ping.options(target=c.PAUSED).push(session, 1))
            session.commit()
        # Pushed later, on the unpaused target: three steps, so three relay passes after `held` committed.
        with Session(engine) as session:
            out["probe"] = str(orch_outbox.push(session, chain(c.ping.s(100), c.ping.s(), c.ping.s())))
            session.commit()
    elif action == "resume":
        out["resumed"] = outbox.resume(target=c.PAUSED)
    elif action == "schedule":
        # Created disabled, so that the minute boundary cannot fire it before it is moved to the past.
        info = outbox.put_schedule({schedule!r}, c.tick.s("cron"), "* * * * *", timezone="UTC", enabled=False)
        out["created_next_run_at"] = info.next_run_at.isoformat()
        past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        out["moved"] = outbox.store.set_schedule({schedule!r}, next_run_at=past, enabled=True)
    else:
        raise SystemExit(f"unknown action {{action!r}}")
engine.dispose()
print(json.dumps(out))
'''


def paused_queue(project: Project) -> str:
    return f"{project.queue}-paused"


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    """A project on RabbitMQ with the workflow commands; stopped, dropped and its queues deleted at teardown."""
    parts = urlsplit(AMQP_URL)
    broker = Broker("rabbitmq", AMQP_URL, parts.hostname or "127.0.0.1", parts.port or 5672)
    require(broker.host or "127.0.0.1", broker.port or 5672, "RabbitMQ")
    pg = urlsplit(PG_URL)
    require(pg.hostname or "127.0.0.1", pg.port or 5432, "PostgreSQL")
    root = tmp_path / "project"
    root.mkdir()
    proj = Project.create(root, broker, PG_URL, unique_prefix() + "wf_")
    # The harness wrote its own commands module; this project declares the workflow commands instead.
    (root / "e2e_commands.py").write_text(COMMANDS.format(queue=proj.queue, paused=paused_queue(proj)))
    (root / "workflows.py").write_text(WORKFLOWS_SCRIPT.format(schedule=SCHEDULE))
    try:
        yield proj
    finally:
        try:
            proj.close()
        finally:
            delete_queue(AMQP_URL, paused_queue(proj))


def run_script(project: Project, *actions: str) -> dict[str, Any]:
    done = project.run([python(), "workflows.py", project.database_url, *actions])
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def start(project: Project, queues: list[str]) -> None:
    """Migrate, then a threads-pool worker consuming ``queues`` and beat; waits until the worker is ready."""
    assert project.prefix in project.migrate()
    argv = project.worker_argv(pool="threads", concurrency=2)
    argv[argv.index("-Q") + 1] = ",".join(queues)
    worker = project.spawn("worker", argv)
    project.wait_for(lambda: " ready." in worker.output(), "the worker to be ready", procs=[worker])
    project.start_beat()


def worker_log(project: Project) -> str:
    return "".join(p.output() for p in project.procs if p.role == "worker")


def batch_row(project: Project, batch_id: str) -> dict[str, Any]:
    found = project.store.batch_stats(uuid.UUID(batch_id))
    assert found is not None, f"no batch {batch_id}{project.report()}"
    return dict(found)


def test_canvases_and_plain_task_end_to_end(project: Project) -> None:
    """Proves, with rows read from the database, after one committed push of three canvases:

    1. ``chord([square(1), square(2), square(3)], total.s())``: the batch is ``finished`` (kind chord, three
       members completed) and the body ``completed`` with ``[1, 4, 9]`` as its input and ``14`` as its result;
    2. ``chain(square.s(4), add_ten.s(), describe.s())`` where ``add_ten`` is a plain ``@app.task`` (registered
       on the worker, run there as a Celery task): every step completed, each step's output passed to the
       next (16 -> 26 -> "got 26"), the plain task's row included;
    3. ``push_batch([ping(10), ping(20)], tenant="acme", then=report.s())``: the continuation ran exactly once
       (one row with the continuation id, one ``report`` row at all, one attempt), completed with the
       members' outcomes, and the batch and its rows carry the tenant.
    """
    start(project, [project.queue])
    registered = project.celery("inspect", "registered", "-d", project.node_name, "--timeout", "10", "--json")
    names = set(json.loads(registered.stdout.strip().splitlines()[-1])[project.node_name])
    assert {"add_ten", "square", "total", "describe", "ping", "report", "tick"} <= names, names

    ids = run_script(project, "canvases")
    # 3 chord members + body, 3 chain steps, 2 batch members + continuation.
    rows = project.wait_drained(expected_rows=10, timeout=STEP_WAIT)
    assert all(r["status"] == "completed" for r in rows), project.report()
    by_id = {str(r["id"]): r for r in rows}

    # 1. The chord.
    chord = project.wait_for(
        lambda: (b := batch_row(project, ids["chord"]))["status"] == "finished" and b,
        "the chord's batch to be finished",
        timeout=STEP_WAIT,
    )
    assert chord["kind"] == "chord", chord
    assert chord["counts"] == {"completed": 3}, chord
    members = sorted((r for r in rows if str(r["batch_id"]) == ids["chord"]), key=lambda r: r["input"]["n"])
    assert [(m["name"], m["input"], m["output"]) for m in members] == [
        ("square", {"n": 1}, 1),
        ("square", {"n": 2}, 4),
        ("square", {"n": 3}, 9),
    ], members
    body = by_id[str(chord["continuation_id"])]
    assert body["name"] == "total" and body["status"] == "completed", body
    assert body["input"] == {"values": [1, 4, 9]}, body
    assert body["output"] == 14, body
    assert body["attempt"] == 1, body

    # 2. The chain through the plain Celery task.
    first = by_id[ids["chain"]]
    assert (first["name"], first["input"], first["output"]) == ("square", {"n": 4}, 16), first
    [plain] = project.store.children(first["id"])
    assert plain["name"] == "add_ten" and plain["status"] == "completed", plain
    assert (plain["input"], plain["output"], plain["attempt"]) == ({"n": 16}, 26, 1), plain
    [last] = project.store.children(plain["id"])
    assert last["name"] == "describe" and last["status"] == "completed", last
    assert (last["input"], last["output"]) == ({"n": 26}, "got 26"), last
    assert project.store.children(last["id"]) == [], "the chain ends after its last step"
    log = worker_log(project)
    assert f"Task add_ten[{plain['id']}] received" in log, log  # a real Celery task on the worker

    # 3. The batch with a continuation, for tenant "acme".
    batch = project.wait_for(
        lambda: (b := batch_row(project, ids["batch"]))["status"] == "finished" and b,
        "the batch to be finished",
        timeout=STEP_WAIT,
    )
    assert batch["kind"] == "batch" and batch["tenant"] == "acme", batch
    assert str(batch["continuation_id"]) == ids["continuation"], batch
    assert batch["counts"] == {"completed": 2}, batch
    assert [by_id[m]["output"] for m in ids["members"]] == [11, 21]
    assert all(by_id[m]["tenant"] == "acme" for m in ids["members"])
    continuations = [r for r in project.rows() if str(r["id"]) == ids["continuation"]]
    assert len(continuations) == 1, continuations
    [cont] = continuations
    assert [r["id"] for r in project.rows() if r["name"] == "report"] == [cont["id"]]
    assert cont["status"] == "completed" and cont["attempt"] == 1, cont
    assert cont["tenant"] == "acme", cont
    assert cont["input"] == {
        "outcomes": [
            {"id": ids["members"][0], "name": "ping", "status": "completed", "output": 11, "error": None},
            {"id": ids["members"][1], "name": "ping", "status": "completed", "output": 21, "error": None},
        ]
    }, cont
    assert cont["output"] == "ping:completed:11,ping:completed:21", cont
    assert log.count(f"Task report[{ids['continuation']}] received") == 1, log
    assert f"Task report[{ids['continuation']}:2]" not in log, log


def test_pause_resume_and_cron_schedule_end_to_end(project: Project) -> None:
    """Proves, with rows read from the database:

    4. after ``pause(target=Q)``, a command pushed to Q stays ``pending`` (never dispatched, attempt 0) while a
       three-step chain pushed *later* on an unpaused target completes (each step needs its own relay pass
       after the held command was committed, so the relay passed it over at least three times); after
       ``resume(target=Q)`` it completes, in its first attempt;
    5. a ``"* * * * *"`` schedule created with ``put_schedule`` (disabled, so that no minute boundary fires it
       first) and then moved to the past and enabled with ``outbox.store.set_schedule`` is fired by beat:
       exactly one command row for that tick (the schedule's ``last_command_id``), and it completes.
    """
    queue = paused_queue(project)
    start(project, [project.queue, queue])

    # 4. Pause, push to the paused target, then observe three relay passes through a later chain.
    ids = run_script(project, "pause", "push_held")
    assert ids["paused"] is True, ids
    probe_done = project.wait_for(
        lambda: (
            (done := [r for r in project.rows() if r["target"] == project.queue and r["status"] == "completed"])
            and len(done) == 3
            and done
        ),
        "the three-step probe chain on the unpaused target to complete",
        timeout=STEP_WAIT,
    )
    assert [r["output"] for r in sorted(probe_done, key=lambda r: r["created_at"])] == [101, 102, 103]
    held = project.row(ids["held"])
    assert held is not None, project.report()
    assert held["target"] == queue, held
    assert held["status"] == "pending", f"{held}{project.report()}"
    assert held["attempt"] == 0 and held["dispatched_at"] is None, held
    assert all(r["created_at"] > held["created_at"] for r in probe_done), (held, probe_done)
    assert f"Task ping[{ids['held']}:" not in worker_log(project)

    # Resume; create the schedule and move it to the past in the same script.
    after = run_script(project, "resume", "schedule")
    assert after["resumed"] is True and after["moved"] is True, after
    done = project.wait_status(ids["held"], "completed", "failed", timeout=STEP_WAIT)
    assert done["status"] == "completed", f"{done}{project.report()}"
    assert (done["output"], done["attempt"]) == (2, 1), done
    assert f"Task ping[{ids['held']}] received" in worker_log(project)

    # 5. Beat fires the overdue cron schedule once.
    fired = project.wait_for(
        lambda: (s := project.store.get_schedule(SCHEDULE)) and s["last_command_id"] is not None and s,
        f"beat to fire the schedule {SCHEDULE!r}",
        timeout=SCHEDULE_WAIT,
    )
    tick = project.wait_status(str(fired["last_command_id"]), "completed", "failed", timeout=STEP_WAIT)
    assert tick["status"] == "completed", f"{tick}{project.report()}"
    assert (tick["name"], tick["input"], tick["output"]) == ("tick", {"label": "cron"}, "tick cron"), tick
    assert tick["target"] == project.queue, tick
    assert fired["next_run_at"] > fired["last_run_at"], fired
    # Rows of this tick: created before the next minute boundary the schedule moved on to (a later,
    # legitimate tick at that boundary is not this one).
    ticks = [r for r in project.rows() if r["name"] == "tick"]
    this_tick = [r for r in ticks if r["created_at"] < fired["next_run_at"]]
    assert [r["id"] for r in this_tick] == [fired["last_command_id"]], ticks
