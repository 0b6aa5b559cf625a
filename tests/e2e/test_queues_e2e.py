"""Queue declarations follow the user's Celery config, on a real RabbitMQ: quorum queues, and no missing queues.

A user's ``task_queues`` naming a target as a quorum queue (``x-queue-type: quorum``) is
what the relay declares and publishes to, and what the worker consumes, whichever side
starts first. With ``task_create_missing_queues = False`` a command whose target has no
queue in ``task_queues`` fails at once with a clear error naming the target (nothing is
declared for it), and the others flow.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .harness import Broker, Project, python, worker_argv
from conftest import AMQP_URL, PG_URL, require, unique_prefix
from support.procs import beat_argv

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    parts = urlsplit(AMQP_URL)
    require(parts.hostname or "127.0.0.1", parts.port or 5672, "RabbitMQ")
    made = Project.create(tmp_path, Broker("rabbitmq", AMQP_URL, parts.hostname, parts.port), PG_URL, unique_prefix())
    yield made
    made.close()


def queue_type(name: str) -> str | None:
    """The type RabbitMQ gives a queue (``rabbitmqctl list_queues name type``), None if there is none."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "type"], capture_output=True, text=True, timeout=60
    ).stdout
    for line in listed.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name:
            return parts[1]
    return None


def push(project: Project, target: str | None = None) -> str:
    option = f".set(queue={target!r})" if target else ""
    script = (
        "import e2e_commands\n"
        "from orch_outbox import default_outbox\n"
        "outbox = default_outbox()\n"
        "with outbox.engine.begin() as conn:\n"
        f"    print(outbox.push(conn, e2e_commands.slow.s(0.0){option}))\n"
    )
    return project.run([python(), "-c", script]).stdout.strip().splitlines()[-1]


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="rabbitmqctl is not installed")
def test_a_quorum_queue_of_the_users_config_is_what_the_relay_declares(project: Project) -> None:
    """Proves a user's `task_queues` with `x-queue-type: quorum` works unchanged: the relay (started first, before
    any worker) declares the target as a quorum queue, the worker consumes it, the command completes."""
    with open(project.root / "celeryconfig.py", "a") as config:
        config.write(
            "from kombu import Queue\n"
            f"task_queues = [Queue({project.queue!r}, queue_arguments={{'x-queue-type': 'quorum'}})]\n"
        )
    project.migrate()
    project.spawn("beat", beat_argv())
    command_id = push(project)
    project.wait_for(lambda: project.store.count(status="dispatched") == 1, "the command published")
    assert queue_type(project.queue) == "quorum"
    argv = worker_argv(project.queue, project.node, "threads", 2)
    project.wait_for(project.spawn("worker", argv, ready_text=" ready.").ready, "the worker to be ready")
    project.wait_for(lambda: project.show(command_id)["status"] == "completed", "the command to complete")


def test_without_missing_queues_a_target_with_no_queue_fails_clearly(project: Project) -> None:
    """Proves `task_create_missing_queues = False`: a command for a target outside `task_queues` fails at once with
    QueueNotFound naming the target (no queue is made for it), and a command for a declared queue still runs."""
    with open(project.root / "celeryconfig.py", "a") as config:
        config.write(
            f"from kombu import Queue\ntask_queues = [Queue({project.queue!r})]\ntask_create_missing_queues = False\n"
        )
    project.migrate()
    project.spawn("beat", beat_argv())
    argv = worker_argv(project.queue, project.node, "threads", 2)
    project.wait_for(project.spawn("worker", argv, ready_text=" ready.").ready, "the worker to be ready")
    stray = f"{project.queue}-nowhere"
    lost = push(project, stray)
    kept = push(project)
    project.wait_for(lambda: project.show(kept)["status"] == "completed", "the declared queue's command")
    project.wait_for(lambda: project.show(lost)["status"] == "failed", "the stray command to fail")
    error = project.show(lost)["error"]
    assert error["type"] == "QueueNotFound" and stray in error["message"], error
    if shutil.which("rabbitmqctl"):
        assert queue_type(stray) is None
