"""A RabbitMQ node lost under load: three nodes, quorum queues, kill -9 of the node everyone is connected to.

A cluster of three nodes on loopback (``support/rmqcluster.py``); the project's
``broker_url`` lists the three (Celery's and kombu's failover), the target is a quorum
queue of ``task_queues`` (replicated on every node), the relay publishes with publisher
confirms. While 2 000 commands flow, the first node (the one the relay and the worker
connected to) is killed with SIGKILL: both fail over to the next node, the quorum queue
elects a new leader, an unconfirmed publish returns its command to pending and a message
delivered but never acknowledged is delivered again (its stale attempt dropped by the
worker's fence). The ledger: every command completed, once recorded (one row, success, its
output); the time from the kill to the flow resuming is printed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import PG_URL, unique_prefix
from e2e.harness import Broker, Project, python, worker_argv
from support import rmqcluster
from support.procs import beat_argv

pytestmark = [
    pytest.mark.ha,
    pytest.mark.timeout(400),
    pytest.mark.skipif(not rmqcluster.available(), reason="Debian's rabbitmq-server is not installed"),
]

COMMANDS = 2_000
KILL_AFTER = 500


@pytest.fixture
def cluster() -> Iterator[rmqcluster.Cluster]:
    started = rmqcluster.Cluster.start(3)
    yield started
    started.stop()


def completed(project: Project) -> int:
    return project.store.count(status="completed")


def test_a_node_lost_under_load_loses_nothing(cluster: rmqcluster.Cluster, tmp_path: Path) -> None:
    """Proves kill -9 of the RabbitMQ node the relay and the worker use, with 2 000 commands flowing over a quorum
    queue: both fail over by themselves and every command completes, its outcome recorded once."""
    first = cluster.nodes[0]
    project = Project.create(tmp_path, Broker("rabbitmq-cluster", cluster.url, "127.0.0.1", first.port), PG_URL,
                             unique_prefix())  # fmt: skip
    try:
        with open(project.root / "celeryconfig.py", "a") as config:
            config.write(
                "from kombu import Queue\n"
                f"task_queues = [Queue({project.queue!r}, queue_arguments={{'x-queue-type': 'quorum'}})]\n"
                'broker_failover_strategy = "round-robin"\n'
                "broker_connection_retry = True\n"
                "broker_connection_max_retries = 100\n"
            )
        project.migrate()
        argv = worker_argv(project.queue, project.node, "threads", 4)
        workers = [project.spawn("worker", argv, ready_text=" ready.")]
        project.wait_for(workers[0].ready, "the worker to be ready")
        beat = project.spawn("beat", beat_argv())

        def supervise() -> None:
            """What systemd's ``Restart=on-failure`` does: a worker that Celery ended during the failover is started
            again. Celery gives up on a 404 for its control queue when the cluster has not yet dropped the dead
            node's copy (``Unrecoverable error: NotFound ... pidbox``); any other exit fails the test."""
            worker = workers[-1]
            if worker.alive():
                return
            assert "Unrecoverable error: NotFound" in worker.output() and len(workers) < 4, project.report()
            worker.expect_alive = False
            workers.append(project.spawn("worker", argv, ready_text=" ready."))

        script = (
            "import e2e_commands\n"
            "from orch_outbox import default_outbox\n"
            "outbox = default_outbox()\n"
            "with outbox.engine.begin() as conn:\n"
            f"    outbox.push_many(conn, [e2e_commands.slow.s(0.0)] * {COMMANDS})\n"
        )
        project.run([python(), "-c", script])
        project.wait_for(lambda: completed(project) >= KILL_AFTER, f"{KILL_AFTER} commands done before the kill")
        before = completed(project)
        first.kill()
        killed = time.monotonic()
        project.wait_for(
            lambda: supervise() or completed(project) >= before + 50,
            "the flow to resume on the other nodes",
            120,
            [beat],
        )
        recovered = time.monotonic() - killed
        project.wait_for(
            lambda: supervise() or completed(project) == COMMANDS, "every command to complete", 240, [beat]
        )

        table = f"{project.prefix}commands"
        with project.store.engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT status, outcome, output, attempt FROM {table}")).all()
        assert len(rows) == COMMANDS
        assert {(r.status, r.outcome) for r in rows} == {("completed", "success")}
        assert all(r.output == 0.0 for r in rows)
        attempts = sum(r.attempt for r in rows)
        print(
            f"\nrabbitmq node lost: {before} done at the kill; flow resumed {recovered:.1f} s after it; "
            f"all {COMMANDS} completed once, {attempts} dispatches in all; "
            f"the worker restarted {len(workers) - 1} time(s)"
        )
    finally:
        project.close()
