"""What a real Flower shows for pushed commands (DESIGN guarantee 8), with real worker, beat and Flower processes.

Flower 2 runs as ``celery -A orch_outbox flower`` in the project folder on RabbitMQ, the workers send task
events (``worker_send_task_events``) and the relay sends ``task-sent`` events (``task_send_sent_event``).
Flower's HTTP API is read as its pages read it; once per run a headless Chromium screenshot of its tasks page
is kept in ``tests/artifacts/``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import WAIT, Project, free_port, python
from .test_e2e import make_project  # noqa: F401 - the fixture

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

PUSH_SCRIPT = '''\
"""Push one command of each kind in the user's own transaction; print their ids."""

import json
import sys

import sqlalchemy as sa
from sqlalchemy.orm import Session

import e2e_commands as c

engine = sa.create_engine(sys.argv[1])
with Session(engine) as session:
    ids = {
        "ok": str(c.send_email.push(session, c.Email("ada@example.com", "flower"))),
        "failing": str(c.import_feed.push(session, "https://example.invalid/flower.xml")),
        "flaky": str(c.flaky.push(session, "flower")),
        "long": str(c.slow.push(session, 25.0)),
    }
    session.commit()
print(json.dumps(ids))
'''


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return json.loads(response.read())


def _post(port: int, path: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def flower_project(make_project: Callable[[str], Project], monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:  # noqa: F811
    monkeypatch.setenv("FLOWER_UNAUTHENTICATED_API", "true")
    project = make_project("rabbitmq")
    config = project.root / "celeryconfig.py"
    config.write_text(config.read_text() + "worker_send_task_events = True\ntask_send_sent_event = True\n")
    (project.root / "flower_push.py").write_text(PUSH_SCRIPT)
    yield project


def _tasks(port: int) -> dict[str, dict[str, Any]]:
    return _get(port, "/api/tasks")  # type: ignore[no-any-return]


def test_flower_shows_each_command_under_its_id_with_its_true_state(flower_project: Project) -> None:
    """Proves, through Flower's own API: one entry per command under its command id, named after the command;
    SUCCESS with the output for a success; FAILURE with the exception and traceback for a command that failed
    for good (after RETRY); RETRY then SUCCESS for a flaky one; REVOKED for a running command revoked with
    Flower's Revoke (which cancels it through the outbox: its row ends canceled); the worker's failed counter
    counts the failure (Flower read "Failed 0" before)."""
    project = flower_project
    project.migrate()
    port = free_port()
    flower = project.spawn(
        "flower", [python(), "-m", "celery", "-A", "orch_outbox", "flower", "--address=127.0.0.1", f"--port={port}"]
    )
    project.wait_for(lambda: _alive(port), "Flower to answer", procs=[flower])
    worker = project.start_worker()
    project.start_beat()
    ids = json.loads(project.run([python(), "flower_push.py", project.database_url]).stdout.strip().splitlines()[-1])

    project.wait_status(ids["long"], "running")
    project.wait_for(lambda: _tasks(port).get(ids["long"], {}).get("state") == "STARTED", "Flower to see it start")
    _post(port, f"/api/task/revoke/{ids['long']}?terminate=true")
    canceled = project.wait_status(ids["long"], "canceled")
    assert canceled["outcome"] == "canceled", canceled
    for key in ("ok", "failing", "flaky"):
        project.wait_status(ids[key], "completed", "failed")

    def settled() -> dict[str, dict[str, Any]] | None:
        tasks = _tasks(port)
        states = {key: tasks.get(cid, {}).get("state") for key, cid in ids.items()}
        wanted = {"ok": "SUCCESS", "failing": "FAILURE", "flaky": "SUCCESS", "long": "REVOKED"}
        return tasks if states == wanted else None

    tasks = project.wait_for(settled, "Flower to show every command's final state", timeout=WAIT)
    assert not [t for t in tasks if ":" in t], "no per-attempt ids"
    names = {key: tasks[cid]["name"] for key, cid in ids.items()}
    assert names == {"ok": "send_email", "failing": "import_feed", "flaky": "flaky", "long": "slow"}
    assert "ada@example.com" in (tasks[ids["ok"]]["result"] or "")
    failing = tasks[ids["failing"]]
    assert "is not a valid feed (attempt 3)" in (failing["exception"] or ""), failing
    assert "Traceback" in (failing["traceback"] or ""), failing
    assert failing["retried"] is not None and tasks[ids["flaky"]]["retried"] is not None
    assert tasks[ids["flaky"]]["result"] and "done on attempt 2" in tasks[ids["flaky"]]["result"]

    def counted() -> list[dict[str, Any]] | None:  # the chained commands' events may still be on their way
        data: list[dict[str, Any]] = _get(port, "/workers?json=1")["data"]
        return data if sum(w.get("task-succeeded", 0) for w in data) >= 4 else None  # ok, its chained command, flaky...

    counters = project.wait_for(counted, "Flower to count the successes", timeout=WAIT)
    assert sum(w.get("task-failed", 0) for w in counters) == 1, counters
    assert "succeeded in" not in _lines_about(worker.output(), ids["failing"]), "a failure logged as a success"
    _screenshot(port)


def _alive(port: int) -> bool:
    try:
        _get(port, "/api/tasks")
    except OSError:
        return False
    return True


def _lines_about(log: str, command_id: str) -> str:
    return "\n".join(line for line in log.splitlines() if command_id in line)


def _screenshot(port: int) -> None:
    """Flower's tasks page as a person sees it, kept as a test artifact (skipped without Debian's chromium)."""
    browser = shutil.which("chromium")
    if browser is None:
        print("\nno chromium on this machine: Flower's tasks page not photographed")
        return
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "flower-tasks.png"
    target.unlink(missing_ok=True)
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,900",
            "--virtual-time-budget=5000",
            f"--screenshot={target}",
            f"http://127.0.0.1:{port}/tasks",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert target.exists() and target.stat().st_size > 10_000, "chromium took no screenshot of Flower"
    print(f"\nFlower's tasks page: {target}")
