"""Long-running jobs and the worker registry under faults: kill -9, a network partition, a blackout, joins.

Real ``celery -A orch_outbox worker`` / ``beat`` subprocesses (``harness.py``). The job
handler (``beacon`` in ``commands.py``) writes a ``beat`` side effect with its process id
every 0.25 s, straight to PostgreSQL: the ledger of who held each job when. The worker
timeout is 3 s (heartbeat 0.5 s), so a dead worker's jobs move within seconds.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from .harness import FaultProject

pytestmark = [pytest.mark.faults, pytest.mark.timeout(120)]

WORKER_TIMEOUT = 3.0
JOBS_CONFIG: dict[str, Any] = {
    "outbox_worker_heartbeat": 0.5,
    "outbox_worker_timeout": WORKER_TIMEOUT,
    "outbox_dispatch_timeout": 30.0,
}


def node(p: FaultProject, index: int) -> str:
    """The Celery nodename of the project's worker ``index`` (``-n fw<index>-<token>@%h``)."""
    return f"{p.node(index)}@{socket.gethostname()}"


def _start_jobs(p: FaultProject, count: int, prefix: str = "job") -> list[uuid.UUID]:
    return [p.outbox.jobs.start(f"{prefix}-{i}", i, command=p.cmd.beacon, target=p.queue) for i in range(count)]


def _holders(p: FaultProject, ids: list[uuid.UUID]) -> Counter[str]:
    """Running jobs per worker nodename."""
    rows = [p.row(i) for i in ids]
    return Counter(r["worker"] for r in rows if r is not None and r["status"] == "running")


def _running_on(p: FaultProject, ids: list[uuid.UUID], node: str, count: int) -> bool:
    return _holders(p, ids).get(node, 0) == count


def _beating(p: FaultProject, ids: list[uuid.UUID], since: Any) -> set[uuid.UUID]:
    """The jobs with a ``beat`` recorded after ``since`` (the database's clock)."""
    return {e["command_id"] for e in p.effects("beat") if e["db_time"] > since and e["command_id"] in set(ids)}


def _attempt_running(p: FaultProject, command_id: uuid.UUID, attempt: int) -> dict[str, Any] | None:
    row = p.row(command_id)
    return row if row is not None and (row["attempt"], row["status"]) == (attempt, "running") else None


def assert_one_holder_at_a_time(p: FaultProject, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[int]]:
    """The ledger: each job's beats, in the database's order, come from one process after another — a process
    that lost the job never beats again, and the next holder's first beat follows the last one's last."""
    holders: dict[uuid.UUID, list[int]] = {}
    for job in ids:
        beats = sorted((e["db_time"], e["pid"]) for e in p.effects("beat", job))
        sequence: list[int] = []
        for _, pid in beats:
            if not sequence or sequence[-1] != pid:
                assert pid not in sequence, f"job {job}: process {pid} beat again after another took over: {beats}"
                sequence.append(pid)
        holders[job] = sequence
    return holders


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_kill9_of_a_worker_moves_its_jobs_and_commands_to_a_live_worker_at_once(lab, pool: str, capsys) -> None:
    """A worker holding 10 jobs and a long command is killed (-9, with its pool); within the worker timeout plus a
    maintenance pass, all 10 jobs run on the survivor (which had room) and the command is retried there — long
    before the command's own lease (its timeout, 60 s, beyond every wait here) would lapse. Never two holders of
    one job at once."""
    p = lab.project(**JOBS_CONFIG)
    p.start_beat()
    first = p.start_worker(pool=pool, concurrency=2)
    ids = _start_jobs(p, 10)
    p.wait_for(lambda: _running_on(p, ids, node(p, 0), 10), "10 jobs running on the first worker")
    [long] = p.push([p.cmd.work.options(timeout=60).s(0, seconds=30, chain=False)])
    p.wait_status(long, "running")
    p.start_worker(pool=pool, concurrency=2)
    p.wait_for(lambda: len(p.outbox.workers().items) == 2, "the second worker in the registry")

    first.kill()
    killed = time.monotonic()
    p.wait_for(lambda: _running_on(p, ids, node(p, 1), 10), "the 10 jobs running on the survivor", timeout=30)
    moved = time.monotonic() - killed
    retried = p.wait_for(lambda: _attempt_running(p, long, 2), "the command's retry running on the survivor")
    took = time.monotonic() - killed
    with capsys.disabled():  # printed in every run, CI's included
        print(f"\nreallocation after kill -9 ({pool}): 10 jobs in {moved:.2f}s, the 60 s command in {took:.2f}s "
              f"(outbox_worker_timeout {WORKER_TIMEOUT}s)")  # fmt: skip
    assert retried["worker"] == node(p, 1) and retried["outcome"] == "lost", retried
    assert [w.name for w in p.outbox.workers()] == [node(p, 1)]
    # A job's row names the survivor a moment before its first beat there is recorded: wait for the beats (a
    # second holder's beat before the first's last would fail at once, inside assert_one_holder_at_a_time).
    p.wait_for(
        lambda: all(len(h) == 2 for h in assert_one_holder_at_a_time(p, ids).values()),
        "every job's beats to come from the first worker, then from the survivor",
    )


def test_a_partitioned_worker_gives_its_jobs_up(lab, capsys) -> None:
    """A worker whose database connection is cut (through a proxy) stops its jobs within half the worker timeout,
    the reaper hands them to the other worker, and when the partition heals the first worker finds them gone
    (fenced) and runs nothing twice: the ledger never shows two holders of a job at once."""
    proxy = lab.proxy("postgres")
    p = lab.project(**JOBS_CONFIG)
    p.start_beat()
    p.start_worker(pool="threads", concurrency=2, db_port=proxy.port, env={"ORCH_OUTBOX_MAX_JOBS": "4"})
    ids = _start_jobs(p, 4)
    p.wait_for(lambda: _running_on(p, ids, node(p, 0), 4), "4 jobs running on the first worker")
    p.start_worker(pool="threads", concurrency=2, env={"ORCH_OUTBOX_MAX_JOBS": "4"})
    p.wait_for(lambda: p.outbox.workers().total == 2, "the second worker in the registry")
    proxy.down()
    cut = time.monotonic()
    # The second worker has had room all along; only the reaper's verdict on the first moves the jobs.
    p.wait_for(lambda: _running_on(p, ids, node(p, 1), 4), "the 4 jobs running on the second worker", timeout=30)
    with capsys.disabled():
        print(f"\npartitioned worker's jobs running elsewhere {time.monotonic() - cut:.2f}s after the cut")
    proxy.restore()
    healed = p.db_now()
    p.wait_for(lambda: node(p, 0) in {w.name for w in p.outbox.workers()}, "the healed worker to register again")
    p.wait_for(lambda: _beating(p, ids, healed) == set(ids), "the jobs beating after the heal")
    assert _holders(p, ids) == Counter({node(p, 1): 4})
    assert_one_holder_at_a_time(p, ids)


def test_after_a_blackout_every_job_runs_again_once(lab) -> None:
    """Every process is killed at once (workers, pools, beat), then started again under the same names: every job
    that was running runs again, each on one worker, once (one new attempt each, one holder each)."""
    p = lab.project(**JOBS_CONFIG)
    beat = p.start_beat()
    workers = [p.start_worker(pool="threads", concurrency=2, env={"ORCH_OUTBOX_MAX_JOBS": "3"}) for _ in range(2)]
    ids = _start_jobs(p, 6)
    p.wait_for(lambda: sum(_holders(p, ids).values()) == 6, "6 jobs running")
    attempts = {i: p.row(i)["attempt"] for i in ids}
    for proc in [*workers, beat]:
        proc.kill()
    dark = p.db_now()
    p.start_beat(schedule="celerybeat-schedule-2")
    for index in range(2):
        p.start_worker(pool="threads", concurrency=2, index=index, env={"ORCH_OUTBOX_MAX_JOBS": "3"})
    p.wait_for(lambda: _beating(p, ids, dark) == set(ids), "every job beating again", timeout=30)
    rows = [p.row(i) for i in ids]
    assert all(r["status"] == "running" and r["attempt"] == attempts[r["id"]] + 1 for r in rows), rows
    assert sorted(_holders(p, ids).values()) == [3, 3]
    starts = Counter(e["command_id"] for e in p.effects("start") if e["db_time"] > dark)
    assert starts == Counter({i: 1 for i in ids}), starts
    assert_one_holder_at_a_time(p, ids)


def test_capacity_holds_under_joins_and_deaths(lab) -> None:
    """Workers of room 3: 5 jobs on one worker run 3 (2 wait pending); a second worker takes the 2; when the first
    dies the survivor fills its room (3) and 2 wait; a third worker takes them. No worker ever holds more than 3."""
    p = lab.project(**JOBS_CONFIG)
    p.start_beat()
    room = {"ORCH_OUTBOX_MAX_JOBS": "3"}
    first = p.start_worker(pool="threads", concurrency=2, env=room)
    ids = _start_jobs(p, 5)
    seen: list[Counter[str]] = []

    def holding(expected: dict[str, int]) -> bool:
        now = _holders(p, ids)
        seen.append(now)
        return now == Counter(expected)

    p.wait_for(lambda: holding({node(p, 0): 3}), "3 jobs on the first worker")
    p.start_worker(pool="threads", concurrency=2, env=room)
    p.wait_for(lambda: holding({node(p, 0): 3, node(p, 1): 2}), "the 2 waiting jobs on the joining worker")
    first.kill()
    p.wait_for(lambda: holding({node(p, 1): 3}), "the survivor's room filled", timeout=30)
    assert sum(1 for i in ids if p.row(i)["status"] == "pending") == 2
    p.start_worker(pool="threads", concurrency=2, env=room)
    p.wait_for(lambda: holding({node(p, 1): 3, node(p, 2): 2}), "the rest on the third worker", timeout=30)
    assert max(n for c in seen for n in c.values()) <= 3, seen
    assert_one_holder_at_a_time(p, ids)


def test_a_stop_reaches_a_running_job_within_a_heartbeat(lab, capsys) -> None:
    """`outbox.jobs.stop(name)` of a running job: its handler sees ``current().canceled`` (or CommandCanceled at
    its heartbeat) and the job is recorded canceled within about a second; it is not restarted."""
    p = lab.project(**JOBS_CONFIG)
    p.start_beat()
    p.start_worker(pool="threads", concurrency=2)
    [job] = _start_jobs(p, 1, prefix="stoppable")
    p.wait_for(lambda: p.effects("beat", job), "the job beating")
    asked = time.monotonic()
    assert p.outbox.jobs.stop("stoppable-0")
    p.wait_status(job, "canceled", timeout=15)
    with capsys.disabled():
        print(f"\nstop reached the job in {time.monotonic() - asked:.2f}s")
    assert p.effects("stopped", job)
    assert p.outbox.jobs.get("stoppable-0").status == "canceled"
    assert [e["attempt"] for e in p.effects("start", job)] == [1]
