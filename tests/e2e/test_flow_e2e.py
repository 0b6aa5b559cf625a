"""Flow control end to end: limits kept across real workers and two relays (``celery beat`` twice), as users run it.

The ledger is the commands' own rows: each ran one attempt (``retries=0``), so its
``started_at`` and ``finished_at`` (written by the workers, from the database clock) say
when it ran; overlaps and gaps are computed from them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .harness import Broker, Project, python, worker_argv
from conftest import AMQP_URL, PG_URL, REDIS_URL, require, unique_prefix
from support.procs import beat_argv

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

POLL = 0.2


def make(root: Path, url: str, name: str) -> Project:
    parts = urlsplit(url)
    require(parts.hostname or "127.0.0.1", parts.port or 5672, name)
    return Project.create(root, Broker(name, url, parts.hostname, parts.port), PG_URL, unique_prefix())


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    made = make(tmp_path, AMQP_URL, "rabbitmq")
    yield made
    made.close()


def configure(project: Project, limits: dict[str, dict[str, object]] | None = None, **conf: object) -> None:
    with open(project.root / "celeryconfig.py", "a") as config:
        if limits is not None:
            config.write(f"outbox_limits = {limits!r}\n")
        for key, value in conf.items():
            config.write(f"{key} = {value!r}\n")


def push_slow(project: Project, count: int, seconds: float, priority: int = 0) -> None:
    """Push ``count`` slow commands in one transaction, as the user's own process would."""
    script = (
        "import e2e_commands\n"
        "from orch_outbox import default_outbox\n"
        "outbox = default_outbox()\n"
        "with outbox.engine.begin() as conn:\n"
        f"    outbox.push_many(conn, [e2e_commands.slow.s({seconds}).set(priority={priority})] * {count})\n"
    )
    project.run([python(), "-c", script])


def start_workers_and_relays(project: Project, workers: int, concurrency: int) -> None:
    for i in range(workers):
        argv = worker_argv(project.queue, f"{project.node}-{i}", "threads", concurrency)
        proc = project.spawn(f"worker{i}", argv, ready_text=" ready.")
        project.wait_for(proc.ready, f"worker {i} to be ready", procs=[proc])
    for i in range(2):  # two relays claim at once
        schedule = project.root / f"celerybeat-schedule-{i}"
        project.spawn(f"beat{i}", beat_argv("--schedule", str(schedule)))


def finished_rows(project: Project, count: int) -> list[dict[str, object]]:
    def done() -> bool:
        return project.store.count(status="completed") == count

    project.wait_for(done, f"{count} commands completed", timeout=180)
    return project.store.find(limit=count)


def most_at_once(rows: list[dict[str, object]]) -> int:
    """The largest number of commands running at the same moment."""
    events = []
    for r in rows:
        start, end = r["started_at"], r["finished_at"]
        assert isinstance(start, datetime) and isinstance(end, datetime)
        events += [(start, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        peak = max(peak, running)
    return peak


def test_concurrency_limit_across_two_workers_and_two_relays(project: Project) -> None:
    """Proves `concurrency: 3` on a target holds across the cluster: two workers of -c4 (8 slots) and two relays,
    24 commands of 0.3 s: never more than 3 ran at once (and 3 did), and all completed."""
    configure(project, {project.queue: {"concurrency": 3}})
    project.migrate()
    start_workers_and_relays(project, workers=2, concurrency=4)
    push_slow(project, 24, 0.3)
    rows = finished_rows(project, 24)
    assert most_at_once(rows) == 3, sorted((r["started_at"], r["finished_at"]) for r in rows)
    assert len({r["worker"] for r in rows}) == 2  # both workers took part
    status = project.cli("status").stdout
    assert "limits:" in status and project.queue in status, status


def test_rate_limit_spaces_starts(project: Project) -> None:
    """Proves `rate: "60/m"` across two relays: 8 commands start one per second, each gap at least a second less
    one poll interval, and the whole run no slower than the rate (7 s) plus a second."""
    configure(project, {"command:slow": {"rate": "60/m"}})
    project.migrate()
    start_workers_and_relays(project, workers=1, concurrency=4)
    push_slow(project, 8, 0.0)
    rows = finished_rows(project, 8)
    starts = sorted(r["started_at"] for r in rows)  # type: ignore[type-var]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]  # type: ignore[operator]
    assert min(gaps) >= 1.0 - POLL - 0.1, gaps
    assert (starts[-1] - starts[0]).total_seconds() <= 7 + 1.0, gaps  # type: ignore[operator]


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"])
def test_priority_reaches_the_broker(tmp_path: Path, broker: str) -> None:
    """Proves `outbox_broker_priority`: 20 low-priority commands published first, then 20 high-priority ones, all
    waiting in the broker while no worker runs; the worker then starts every high one before any low one."""
    url = AMQP_URL if broker == "rabbitmq" else REDIS_URL.rsplit("/", 1)[0] + "/13"
    project = make(tmp_path, url, broker)
    try:
        configure(project, outbox_broker_priority=True, task_queue_max_priority=10)
        project.migrate()
        project.spawn("beat", beat_argv())

        def dispatched(n: int) -> bool:
            return project.store.count(status="dispatched") == n

        push_slow(project, 20, 0.0, priority=0)
        project.wait_for(lambda: dispatched(20), "20 low-priority messages in the broker")
        push_slow(project, 20, 0.0, priority=9)
        project.wait_for(lambda: dispatched(40), "20 high-priority messages in the broker too")
        argv = worker_argv(project.queue, project.node, "threads", 1)
        project.wait_for(project.spawn("worker", argv, ready_text=" ready.").ready, "the worker to be ready")
        rows = sorted(finished_rows(project, 40), key=lambda r: r["started_at"])  # type: ignore[arg-type,return-value]
        assert [r["priority"] for r in rows] == [9] * 20 + [0] * 20, [r["priority"] for r in rows]
    finally:
        project.close()
