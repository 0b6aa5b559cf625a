"""`orch-outbox status / show / cancel` on a SQLite outbox (no servers), through click's runner."""

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

APP_MODULE = '''
from celery import Celery
from orch_outbox import Outbox

app = Celery("cli-test", broker="memory://", set_as_current=False)
outbox = Outbox(app, "sqlite:///{db}")
outbox.create_tables()

@outbox.command(target="mail")
def send(to: str) -> None: ...

@outbox.command(target="mail")
def noted(to: str) -> None: ...

@send.if_canceled
def _(outcome):
    return [noted.s(outcome.input["to"])]
'''


@pytest.fixture
def cli_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    name = f"cli_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP_MODULE.format(db=tmp_path / "cli.sqlite3"))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    yield module, f"{name}:outbox"
    module.outbox.engine.dispose()
    sys.modules.pop(name, None)


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_status_show_and_cancel(cli_app: Any) -> None:
    """Proves the operator's view: counts by target and status, one command with its chain as JSON, and a
    cancel that says what it did (and refuses, with a non-zero exit, when there is nothing to cancel)."""
    module, path = cli_app
    command_id = module.send.push(module.outbox.engine, "ada@example.com")

    status = run("-A", path, "status", "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.output) == {"mail": {"pending": 1}}

    canceled = run("-A", path, "cancel", str(command_id))
    assert canceled.exit_code == 0 and f"canceled {command_id}" in canceled.output

    shown = run("-A", path, "show", str(command_id), "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert (data["status"], data["outcome"], data["input"]) == ("canceled", "canceled", {"to": "ada@example.com"})
    assert [c["name"] for c in data["children"]] == ["noted"]

    again = run("-A", path, "cancel", str(command_id))
    assert again.exit_code != 0 and "already canceled" in again.output

    human = run("-A", path, "status")
    assert "mail" in human.output and "canceled" in human.output


def test_show_unknown_and_malformed_ids(cli_app: Any) -> None:
    """Proves a wrong id gets a clear message and a non-zero exit, never a traceback."""
    _, path = cli_app
    missing = run("-A", path, "show", str(uuid.uuid4()))
    assert missing.exit_code != 0 and "no command" in missing.output
    bad = run("-A", path, "show", "not-a-uuid")
    assert bad.exit_code != 0 and "Traceback" not in bad.output
