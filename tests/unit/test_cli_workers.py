"""`orch-outbox workers`, `jobs` and `list --status` on a SQLite outbox (no servers), through click's runner."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from orch_outbox.cli import main
from orch_outbox.workers import Identity, Presence

APP_MODULE = """
from celery import Celery
from orch_outbox import Outbox, current

app = Celery("cli-workers-test", broker="memory://", set_as_current=False)
outbox = Outbox(app, "sqlite:///{db}")
outbox.create_tables()

@outbox.command(target="feeds")
def watch(name: str, argument=None) -> None: ...

@outbox.command(target="mail")
def send(to: str) -> None: ...
"""


@pytest.fixture
def cli_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    name = f"cli_workers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP_MODULE.format(db=tmp_path / "cli.sqlite3"))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    yield module, f"{name}:outbox"
    module.outbox.engine.dispose()
    sys.modules.pop(name, None)


def run(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_workers_lists_live_workers_with_what_they_run(cli_app: Any) -> None:
    """Proves `orch-outbox workers` shows each registered worker with its running jobs (table and JSON, with the
    total), and `workers NAME` one of them; an unknown name is a clear error."""
    module, app = cli_app
    outbox = module.outbox
    presence = Presence(outbox.store, outbox.settings, Identity.of("w1@host", "threads", 4, ["feeds"], 5))
    assert presence.beat_once()
    job = outbox.jobs.start("feed-1", "https://example.org/a", command=module.watch, target="feeds")
    assert outbox.store.claim_jobs("w1@host", ["feeds"], 1, 30.0)
    text = run("-A", app, "workers").output
    assert "w1@host" in text and "1/5" in text and "(1-1 of 1)" in text
    data = json.loads(run("-A", app, "workers", "--json").output)
    assert data["total"] == 1
    (worker,) = data["workers"]
    assert worker["running"][0]["id"] == str(job) and worker["running"][0]["name"] == "feed-1"
    one = run("-A", app, "workers", "w1@host").output
    assert "feed-1" in one and "jobs" in one
    missing = CliRunner().invoke(main, ["-A", app, "workers", "nobody@host"])
    assert missing.exit_code != 0 and "nobody@host" in missing.output


def test_jobs_start_list_show_stop(cli_app: Any) -> None:
    """Proves the jobs commands: start prints the id (again the same id for the same name), list pages with a
    total, show reads one by name, stop cancels a pending job at once."""
    module, app = cli_app
    first = run("-A", app, "jobs", "start", "feed-1", "--command", "watch", "--argument", '{"url": "a"}').output
    again = run("-A", app, "jobs", "start", "feed-1", "--command", "watch").output
    assert first == again
    run("-A", app, "jobs", "start", "feed-2", "--command", "watch", "--target", "feeds")
    listed = run("-A", app, "jobs", "list", "--limit", "1").output
    assert "(1-1 of 2)" in listed
    shown = run("-A", app, "jobs", "show", "feed-1").output
    assert "{'url': 'a'}" in shown and "pending" in shown
    assert "stopping" in run("-A", app, "jobs", "stop", "feed-1").output
    assert module.outbox.jobs.get("feed-1").status == "canceled"


def test_list_by_status_with_total(cli_app: Any) -> None:
    """Proves `orch-outbox list --status` lists any state (not only the dead letters), pages, and counts them all;
    an unknown state is refused by the option itself."""
    module, app = cli_app
    for i in range(3):
        module.send.push(module.outbox.engine, f"user{i}@example.org")
    text = run("-A", app, "list", "--status", "pending", "--limit", "2").output
    assert "(1-2 of 3)" in text and text.count("send") == 2
    assert "(none of 0)" in run("-A", app, "list", "--status", "running").output
    bad = CliRunner().invoke(main, ["-A", app, "list", "--status", "sleeping"])
    assert bad.exit_code == 2


def test_bulk_acts_on_what_matches_after_a_confirmation(cli_app: Any) -> None:
    """Proves `orch-outbox bulk`: it asks before acting (answering no changes nothing), acts on exactly the commands
    matching the filters with --yes, and refuses to run without a filter."""
    module, app = cli_app
    outbox = module.outbox
    ids = [module.send.push(outbox.engine, f"user{i}@example.org") for i in range(3)]
    other = module.watch.push(outbox.engine, "feed", None)
    declined = CliRunner().invoke(main, ["-A", app, "bulk", "cancel", "--name", "send"], input="n\n")
    assert declined.exit_code == 1 and "cancel 3 command(s)?" in declined.output
    assert {outbox.get(i).status for i in ids} == {"pending"}
    done = run("-A", app, "bulk", "cancel", "--name", "send", "--yes").output
    assert "cancel: 3 of 3 changed" in done
    assert {outbox.get(i).status for i in ids} == {"canceled"} and outbox.get(other).status == "pending"
    assert CliRunner().invoke(main, ["-A", app, "bulk", "purge"]).exit_code == 2
    assert "3 of 3 changed" in run("-A", app, "bulk", "purge", "--status", "canceled", "--yes").output
    assert "(1-1 of 1)" in run("-A", app, "list", "--sort", "due").output
