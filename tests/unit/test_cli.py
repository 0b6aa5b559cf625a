"""`orch-outbox` on a SQLite outbox (no servers), through click's runner: status / show / cancel, batches,
tenants, pause and resume, the dead letters, retention clean-up and cron schedules."""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from orch_outbox.cli import main
from orch_outbox.store import ErrorInfo

APP_MODULE = """
from celery import Celery
from orch_outbox import Outbox

app = Celery("cli-test", broker="memory://", set_as_current=False)
outbox = Outbox(app, "sqlite:///{db}")
outbox.create_tables()

@outbox.command(target="mail")
def send(to: str) -> None: ...

@outbox.command(target="mail")
def noted(to: str) -> None: ...

@outbox.command(target="reports")
def summarize(outcomes: list) -> None: ...

@send.if_canceled
def _(outcome):
    return [noted.s(outcome.input["to"])]
"""


@pytest.fixture
def cli_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    name = f"cli_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP_MODULE.format(db=tmp_path / "cli.sqlite3"))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    yield module, f"{name}:outbox"
    module.outbox.engine.dispose()
    sys.modules.pop(name, None)


def run(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def run_json(*args: str) -> Any:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def settle(outbox: Any, limit: int = 100, error: ErrorInfo | None = None) -> list[uuid.UUID]:
    """Claim, start and finish up to ``limit`` due commands as a worker records them: failed with ``error``, or
    completed when there is none. Returns their ids."""
    settled = []
    for d in outbox.store.claim(limit, 60.0):
        assert outbox.store.start(d.id, d.attempt, d.name, "worker-1", 60.0) is not None
        if error is None:
            assert outbox.store.complete(d.id, d.attempt, None, [])
        else:
            assert outbox.store.fail(d.id, d.attempt, "failure", error, [])
        settled.append(d.id)
    return settled


def refused(result: Any, message: str) -> None:
    """A refusal a user can read: non-zero exit, the message, no traceback."""
    assert result.exit_code != 0, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_status_show_and_cancel(cli_app: Any) -> None:
    """Proves the operator's view: counts by target and status, one command with its chain as JSON, and a
    cancel that says what it did (and refuses, with a non-zero exit, when there is nothing to cancel)."""
    module, path = cli_app
    command_id = module.send.push(module.outbox.engine, "ada@example.com")

    status = run("-A", path, "status", "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout) == {"mail": {"pending": 1}}

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


def test_help_lists_the_operator_commands() -> None:
    """Proves `orch-outbox --help` shows every group and command an operator looks for."""
    shown = run("--help")
    assert shown.exit_code == 0
    commands = ("batches", "tenant", "pause", "resume", "paused", "failed", "requeue", "purge", "cleanup", "schedules")
    for name in commands:
        assert f"\n  {name} " in shown.output, name
    assert all(c in run("schedules", "--help").output for c in ("add", "list", "show", "delete", "enable", "tick"))
    assert all(c in run("batches", "--help").output for c in ("list", "show", "cancel"))


def test_schedules_round_trip(cli_app: Any) -> None:
    """Proves a schedule added on the command line stores the command, its arguments, cron, zone and options as
    given; lists and shows as text and JSON; disable and enable switch it; a due tick pushes exactly one command
    with those arguments; delete removes it, after which it is reported unknown."""
    module, path = cli_app
    nightly = ["nightly", "send", "--cron", "*/5 * * * *", "--args", '["ada@example.com"]']
    options = ["--timezone", "Europe/Paris", "--unique", "--tenant", "acme", "--target", "urgent-mail"]
    added = run_json("-A", path, "schedules", "add", *nightly, *options)
    expected = {
        "name": "nightly",
        "command": "send",
        "input": {"to": "ada@example.com"},
        "cron": "*/5 * * * *",
        "timezone": "Europe/Paris",
        "unique": True,
        "enabled": True,
        "tenant": "acme",
        "target": "urgent-mail",
    }
    assert {k: added[k] for k in expected} == expected
    other = ["other", "send", "--cron", "0 9 * * mon-fri", "--kwargs", '{"to": "bob@example.com"}', "--disabled"]
    kw = run_json("-A", path, "schedules", "add", *other)
    assert (kw["input"], kw["enabled"], kw["target"]) == ({"to": "bob@example.com"}, False, "mail")
    assert kw["timezone"] == "UTC"

    listed = run_json("-A", path, "schedules", "list")
    assert [s["name"] for s in listed] == ["nightly", "other"]
    assert [s["name"] for s in run_json("-A", path, "schedules", "list", "--limit", "1", "--offset", "1")] == ["other"]
    human = run("-A", path, "schedules", "list").output
    assert "nightly" in human and "*/5 * * * *" in human and "Europe/Paris" in human
    assert run_json("-A", path, "schedules", "show", "nightly") == listed[0]
    assert "ada@example.com" in run("-A", path, "schedules", "show", "nightly").output

    disabled = run("-A", path, "schedules", "disable", "nightly")
    assert disabled.exit_code == 0 and "disabled" in disabled.output
    assert module.outbox.schedule("nightly").enabled is False
    enabled = run("-A", path, "schedules", "enable", "nightly")
    assert enabled.exit_code == 0 and "enabled; next run at" in enabled.output
    assert module.outbox.schedule("nightly").enabled is True

    assert "no schedule was due" in run("-A", path, "schedules", "tick").output
    module.outbox.store.set_schedule("nightly", next_run_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    [ticked] = run_json("-A", path, "schedules", "tick")
    assert ticked["name"] == "nightly" and ticked["skipped"] is None
    pushed = module.outbox.get(ticked["command_id"])
    assert (pushed.name, pushed.input, pushed.target, pushed.tenant) == ("send", added["input"], "urgent-mail", "acme")
    assert run_json("-A", path, "schedules", "tick") == []

    deleted = run("-A", path, "schedules", "delete", "nightly")
    assert deleted.exit_code == 0 and "deleted schedule 'nightly'" in deleted.output
    assert [s.name for s in module.outbox.schedules()] == ["other"]
    refused(run("-A", path, "schedules", "show", "nightly"), "no schedule named 'nightly'")
    refused(run("-A", path, "schedules", "delete", "nightly"), "no schedule named 'nightly'")
    refused(run("-A", path, "schedules", "enable", "nightly"), "no schedule named 'nightly'")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cron", "*/5 * * *"], "must be five ASCII fields"),
        (["--cron", "61 * * * *"], "invalid cron expression"),
        (["--cron", "* * * * *", "--timezone", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
        (["--cron", "* * * * *", "--args", '["a"'], "is not valid JSON"),
        (["--cron", "* * * * *", "--args", '{"to": "a"}'], "is not a JSON array"),
        (["--cron", "* * * * *", "--kwargs", '["a"]'], "is not a JSON object"),
        (["--cron", "* * * * *"], "arguments do not match the handler"),
        (["--cron", "* * * * *", "--args", '["a"]', "--target", "bad target!"], "target"),
    ],
)
def test_schedules_add_refuses_bad_input(cli_app: Any, options: list[str], message: str) -> None:
    """Proves a bad cron, time zone, JSON argument, call or target is refused with its reason, and nothing is
    stored."""
    module, path = cli_app
    refused(run("-A", path, "schedules", "add", "s", "send", *options), message)
    assert module.outbox.schedules() == []


def test_schedules_add_refuses_an_unknown_command(cli_app: Any) -> None:
    """Proves a schedule of a command no worker knows is refused before it is stored."""
    module, path = cli_app
    refused(run("-A", path, "schedules", "add", "s", "nope", "--cron", "* * * * *"), "no outbox command")
    assert module.outbox.schedules() == []


def test_pause_paused_and_resume(cli_app: Any) -> None:
    """Proves pause holds commands back (one target or everything), `paused` lists what is in force, and resume
    lifts exactly the pause named, saying what is still paused."""
    module, path = cli_app
    outbox = module.outbox
    command_id = module.send.push(outbox.engine, "ada@example.com")

    assert "paused target 'mail'" in run("-A", path, "pause", "--target", "mail").output
    assert "already paused" in run("-A", path, "pause", "--target", "mail").output
    assert "paused everything" in run("-A", path, "pause").output
    assert "paused tenant 'acme'" in run("-A", path, "pause", "--tenant", "acme").output
    pauses = run_json("-A", path, "paused")
    assert {(p["scope"], p["value"]) for p in pauses} == {("all", ""), ("target", "mail"), ("tenant", "acme")}
    assert all(p["paused_at"] for p in pauses)
    assert "mail" in run("-A", path, "paused").output
    assert outbox.store.claim(10, 60.0) == []

    resumed = run("-A", path, "resume")
    assert "resumed everything" in resumed.output and "still paused: target 'mail', tenant 'acme'" in resumed.output
    assert outbox.store.claim(10, 60.0) == []  # the target's own pause still holds
    assert "resumed tenant 'acme'" in run("-A", path, "resume", "--tenant", "acme").output
    assert "resumed target 'mail'" in run("-A", path, "resume", "--target", "mail").output
    assert [d.id for d in outbox.store.claim(10, 60.0)] == [command_id]
    assert "target 'mail' was not paused" in run("-A", path, "resume", "--target", "mail").output
    assert "nothing is paused" in run("-A", path, "paused").output

    refused(run("-A", path, "pause", "--target", "mail", "--tenant", "acme"), "not both")
    assert outbox.paused() == []


def test_failed_requeue_and_purge(cli_app: Any) -> None:
    """Proves the dead-letter workflow: `failed` shows each error (clipped in the table, whole in JSON);
    requeue and purge refuse an empty selection and change nothing; requeue by id brings one back to pending;
    purge asks first (a "no" keeps everything) and deletes only the selected status."""
    module, path = cli_app
    outbox = module.outbox
    long_message = "SMTP said no\n" + "x" * 200
    module.send.push(outbox.engine, "ada@example.com")
    [first] = settle(outbox, error=ErrorInfo("ConnectionError", long_message, "Traceback: ..."))
    module.noted.push(outbox.engine, "bob@example.com")
    [second] = settle(outbox, error=ErrorInfo("ValueError", "bad address"))
    module.send.push(outbox.engine, "eve@example.com")
    [done] = settle(outbox)

    dead = run_json("-A", path, "failed")
    assert [d["id"] for d in dead] == [str(second), str(first)]
    assert dead[1]["error"] == {"type": "ConnectionError", "message": long_message, "traceback": "Traceback: ..."}
    human = run("-A", path, "failed").output
    assert "ValueError: bad address" in human and "ConnectionError: SMTP said no xxx" in human
    assert "x" * 100 not in human and "..." in human
    assert [d["name"] for d in run_json("-A", path, "failed", "--name", "send")] == ["send"]
    assert [d["id"] for d in run_json("-A", path, "failed", "--limit", "1", "--offset", "1")] == [str(first)]
    assert run_json("-A", path, "failed", "--target", "other") == []

    refused(run("-A", path, "requeue"), "requeue needs IDS, a filter (--name, --target, --tenant) or --all")
    refused(run("-A", path, "purge", "--yes"), "purge needs IDS")
    refused(run("-A", path, "requeue", "not-an-id"), "is not an id")
    assert len(outbox.failed()) == 2

    requeued = run("-A", path, "requeue", str(first))
    assert requeued.exit_code == 0 and "re-queued 1 failed command(s)" in requeued.output
    back = outbox.get(first)
    assert (back.status, back.retries_left, back.error) == ("pending", back.retries, None)
    assert "nothing re-queued" in run("-A", path, "requeue", str(first)).output

    kept = run("-A", path, "purge", "--all", input="n\n")
    assert kept.exit_code != 0 and "delete every failed command for good?" in kept.output
    assert [c.id for c in outbox.failed()] == [second]
    purged = run("-A", path, "purge", "--name", "noted", input="y\n")
    assert purged.exit_code == 0 and "with name 'noted'" in purged.output
    assert "deleted 1 failed command(s)" in purged.output
    assert outbox.failed() == []
    completed = run("-A", path, "purge", str(done), "--status", "completed", "--yes")
    assert completed.exit_code == 0 and "deleted 1 completed command(s)" in completed.output
    assert {c.status for c in outbox.find()} == {"pending"}
    refused(run("-A", path, "purge", "--status", "pending", "--all", "--yes"), "Invalid value for '--status'")


def test_cleanup_deletes_rows_past_retention(cli_app: Any) -> None:
    """Proves `cleanup` deletes a completed command finished longer ago than the retention, keeps a recent one,
    and prints the count."""
    module, path = cli_app
    outbox = module.outbox
    module.send.push(outbox.engine, "old@example.com")
    [old] = settle(outbox)
    module.send.push(outbox.engine, "new@example.com")
    [new] = settle(outbox)
    table = outbox.store.table
    with outbox.engine.begin() as conn:
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
        conn.execute(sa.update(table).where(table.c.id == old).values(finished_at=long_ago))

    cleaned = run("-A", path, "cleanup")
    assert cleaned.exit_code == 0 and "deleted 1 row(s) past their retention" in cleaned.output
    assert [c.id for c in outbox.find()] == [new]
    assert "deleted 0 row(s)" in run("-A", path, "cleanup").output


def test_batches_list_show_and_cancel(cli_app: Any) -> None:
    """Proves an operator can find a tenant's batch, read its counts, progress, timings, continuation and members,
    and cancel it once: its pending member is canceled and its continuation never runs."""
    module, path = cli_app
    outbox = module.outbox
    members = [module.send.s("a@example.com"), module.send.s("b@example.com")]
    ref = outbox.push_batch(outbox.engine, members, tenant="acme", then=module.summarize.s())
    [failed] = settle(outbox, limit=1, error=ErrorInfo("ValueError", "bounced"))
    [pending] = [m for m in ref.member_ids if m != failed]

    [listed] = run_json("-A", path, "batches", "list")
    assert (listed["id"], listed["tenant"], listed["status"]) == (str(ref.id), "acme", "open")
    progress = (listed["counts"], listed["total"], listed["done"], listed["progress"])
    assert progress == ({"failed": 1, "pending": 1}, 2, 1, 0.5)
    assert run_json("-A", path, "batches", "list", "--tenant", "other") == []
    assert run_json("-A", path, "batches", "list", "--status", "finished") == []
    assert run_json("-A", path, "batches", "list", "--offset", "1") == []
    assert "50.0%" in run("-A", path, "batches", "list").output
    refused(run("-A", path, "batches", "list", "--status", "done"), "Invalid value for '--status'")

    shown = run("-A", path, "batches", "show", str(ref.id), "--members")
    assert shown.exit_code == 0, shown.output
    for text in ("acme", "1/2 final (50.0%)", "failed 1, pending 1", str(ref.continuation_id), "ValueError: bounced"):
        assert text in shown.output, text
    data = run_json("-A", path, "batches", "show", str(ref.id), "--members")
    assert data["continuation_id"] == str(ref.continuation_id) and data["first_started_at"] is not None
    assert {m["id"] for m in data["members"]} == {str(m) for m in ref.member_ids}
    assert "members" not in run_json("-A", path, "batches", "show", str(ref.id))

    canceled = run("-A", path, "batches", "cancel", str(ref.id))
    assert canceled.exit_code == 0 and "1 member(s) canceled" in canceled.output
    assert outbox.get(pending).status == "canceled" and outbox.batch(ref.id).status == "canceled"
    assert "never runs" in run("-A", path, "batches", "show", str(ref.id)).output
    refused(run("-A", path, "batches", "cancel", str(ref.id)), "already canceled; nothing canceled")
    assert outbox.children(pending)[0].name == "noted"  # the member's own on-cancel command ran as usual
    with pytest.raises(Exception, match="no command"):
        outbox.get(ref.continuation_id)


def test_tenant_stats(cli_app: Any) -> None:
    """Proves `tenant` counts one tenant's commands and batches by state, and none of another tenant's."""
    module, path = cli_app
    outbox = module.outbox
    outbox.push_batch(outbox.engine, [module.send.s("a@example.com"), module.send.s("b@example.com")], tenant="acme")
    outbox.push(outbox.engine, module.send.s("c@example.com"), tenant="globex")
    settle(outbox, limit=1)

    stats = run_json("-A", path, "tenant", "acme")
    assert stats["tenant"] == "acme" and stats["batches"] == {"open": 1}
    assert sum(stats["commands"].values()) == 2 and set(stats["commands"]) <= {"completed", "pending"}
    empty = {"tenant": "initech", "commands": {}, "batches": {}, "mean_run_seconds": None}
    assert run_json("-A", path, "tenant", "initech") == empty
    human = run("-A", path, "tenant", "acme").output
    assert "(2 in all)" in human and "open 1" in human


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["batches", "show", "00000000-0000-0000-0000-000000000000"], "no batch with id"),
        (["batches", "show", "nope"], "'nope' is not an id"),
        (["batches", "cancel", "00000000-0000-0000-0000-000000000000"], "no batch with id"),
        (["schedules", "show", "nope"], "no schedule named 'nope'"),
        (["schedules", "disable", "nope"], "no schedule named 'nope'"),
        (["failed", "--limit", "0"], "Invalid value for '--limit'"),
        (["failed", "--limit", "100000"], "limit must be an integer"),
        (["pause", "--target", "bad target!"], "target"),
    ],
)
def test_unknown_names_and_bad_values_are_clear_errors(cli_app: Any, args: list[str], message: str) -> None:
    """Proves an unknown batch id or schedule name, or a bad value, is one readable line and a non-zero exit."""
    _, path = cli_app
    refused(run("-A", path, *args), message)
