"""End to end: ``orch-outbox migrate``, ``celery -A orch_outbox worker -Q <queue>``, ``celery -A orch_outbox beat``
and a separate process pushing commands, exactly as a user runs them. See ``harness.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .harness import CLI_TIMEOUT, Broker, Project, assert_only_queue, clean_env, orch_outbox_cli
from conftest import AMQP_URL, PG_URL, REDIS_URL, require, unique_prefix

pytestmark = pytest.mark.e2e

REDIS_E2E_URL = REDIS_URL.rsplit("/", 1)[0] + "/14"


def _broker(name: str, url: str | None) -> Broker:
    if url is None:
        return Broker(name, None)
    parts = urlsplit(url)
    return Broker(name, url, parts.hostname or "127.0.0.1", parts.port)


BROKERS = {
    "rabbitmq": _broker("rabbitmq", AMQP_URL),
    "redis": _broker("redis", REDIS_E2E_URL),
    "embedded": _broker("embedded", None),
}


@pytest.fixture
def make_project(tmp_path: Path) -> Iterator[Callable[[str], Project]]:
    """Build a project folder on a broker; every process it started is stopped at teardown."""
    projects: list[Project] = []

    def make(broker_name: str) -> Project:
        broker = BROKERS[broker_name]
        if broker.url is not None:
            assert broker.host and broker.port
            require(broker.host, broker.port, broker.name)
            pg = urlsplit(PG_URL)
            require(pg.hostname or "127.0.0.1", pg.port or 5432, "PostgreSQL")
        root = tmp_path / f"project-{len(projects)}"
        root.mkdir()
        project = Project.create(root, broker, PG_URL, unique_prefix() + "e2e_")
        projects.append(project)
        return project

    yield make
    errors = []
    for project in projects:
        try:
            project.close()
        except Exception as exc:  # close every project, then report
            errors.append(exc)
    if errors:
        raise errors[0]


def run_flow(project: Project, pool: str = "threads") -> None:
    """The main scenario: success with a chained command, a rollback, a failure after retries with its chain."""
    migrated = project.migrate()
    assert project.prefix in migrated, migrated

    worker = project.start_worker(pool=pool)
    project.start_beat()
    # Only a worker on the command queue and beat: no extra queue, no other process.
    assert [p.role for p in project.procs] == ["worker", "beat"]
    assert_only_queue(worker.argv, project.queue)

    ids = project.push()
    rows = project.wait_drained(expected_rows=4)
    by_name = {r["name"]: r for r in rows}
    assert sorted(by_name) == ["alert_ops", "import_feed", "record_delivery", "send_email"], rows

    # The rolled-back push never existed.
    assert project.row(ids["ghost"]) is None
    assert all(r["input"].get("email", {}).get("to") != "ghost@example.com" for r in rows)
    missing = project.show(ids["ghost"], check=False)
    assert missing.get("exit", 0) != 0 and "no command" in missing["stderr"], missing

    # Success: typed output recorded, the `then` chain ran with the parent's output.
    sent = project.show(ids["send_email"])
    assert sent["status"] == "completed", sent
    assert sent["outcome"] == "success", sent
    assert sent["attempt"] == 1
    assert sent["input"] == {"email": {"to": "ada@example.com", "subject": "welcome"}}
    assert sent["output"] == {"to": "ada@example.com", "message_id": "msg-ada@example.com-welcome", "attempt": 1}
    assert sent["error"] is None
    assert sent["worker"] == project.node_name, sent
    [delivery] = sent["children"]
    assert delivery["name"] == "record_delivery"
    assert delivery["status"] == "completed", delivery
    assert delivery["parent_id"] == ids["send_email"]
    assert delivery["input"] == {"sent": sent["output"]}
    assert delivery["output"] == "delivered msg-ada@example.com-welcome to ada@example.com"

    # Failure: retries=2 means three attempts, then failed, and only then the if_failed chain.
    failed = project.show(ids["import_feed"])
    assert failed["status"] == "failed", failed
    assert failed["outcome"] == "failure", failed
    assert failed["attempt"] == 3, failed
    assert failed["retries"] == 2 and failed["retries_left"] == 0, failed
    assert failed["error"]["type"] == "ValueError", failed["error"]
    assert "attempt 3" in failed["error"]["message"], failed["error"]
    assert failed["output"] is None
    [alert] = failed["children"]
    assert alert["name"] == "alert_ops"
    assert alert["status"] == "completed", alert
    assert alert["parent_id"] == ids["import_feed"]
    assert alert["output"] == "paged on-call: import_feed failed: ValueError"

    # Counts by target.
    assert project.status() == {project.queue: {"completed": 3, "failed": 1}}

    # Each attempt travelled as a real, named Celery task on the worker.
    log = worker.output()
    # One Celery task id per command (its command id), as Celery's own retries keep one id.
    assert log.count(f"Task send_email[{ids['send_email']}] received") == 1, log
    assert log.count(f"Task import_feed[{ids['import_feed']}] received") == 3, log


@pytest.mark.parametrize("broker", ["rabbitmq", "redis", "embedded"])
def test_command_flows(make_project: Callable[[str], Project], broker: str) -> None:
    """test_only_worker_and_beat_needed is covered here: the worker consumes exactly ``-Q <queue>``."""
    run_flow(make_project(broker))


def test_prefork_pool(make_project: Callable[[str], Project]) -> None:
    run_flow(make_project("rabbitmq"), pool="prefork")


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_worker_registers_commands(make_project: Callable[[str], Project], broker: str) -> None:
    """Each command is a real named Celery task (what Flower shows), and the worker consumes only its queue."""
    project = make_project(broker)
    project.migrate()  # a worker refuses to start on a database without the outbox tables
    project.start_worker()

    registered = project.celery("inspect", "registered", "-d", project.node_name, "--timeout", "10", "--json")
    replies = json.loads(registered.stdout.strip().splitlines()[-1])
    assert set(replies) == {project.node_name}, replies
    names = set(replies[project.node_name])
    assert {"send_email", "record_delivery", "import_feed", "alert_ops", "slow"} <= names, names

    queues = project.celery("inspect", "active_queues", "-d", project.node_name, "--timeout", "10", "--json")
    replies = json.loads(queues.stdout.strip().splitlines()[-1])
    assert [q["name"] for q in replies[project.node_name]] == [project.queue], replies


def test_demo_command(tmp_path: Path) -> None:
    home = tmp_path / "demo-home"
    done = subprocess.run(
        [*orch_outbox_cli(), "demo", "--home", str(home)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT * 2,
        check=False,
    )
    print(done.stdout, done.stderr, file=sys.stderr)
    assert done.returncode == 0, (done.stdout, done.stderr)
    rows = {
        line.split()[0]: line.split()[1]
        for line in done.stdout.splitlines()
        if line and line.split()[0].isidentifier() and len(line.split()) > 1
    }
    assert rows["charge_card"] == "completed", done.stdout
    assert rows["send_receipt"] == "completed", done.stdout
    assert rows["import_feed"] == "failed", done.stdout
    assert rows["alert_ops"] == "completed", done.stdout
    assert rows["send_newsletter"] == "canceled", done.stdout
    assert (home / "outbox.sqlite3").exists()
