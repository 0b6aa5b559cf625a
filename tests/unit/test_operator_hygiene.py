"""Operator hygiene: masked passwords, one clear line when the database cannot serve, quiet service tasks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from orch_outbox.cli import main
from orch_outbox.wiring import QuietServices

from conftest import PG_URL, require

CELERY = [sys.executable, "-m", "celery"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "ORCH_OUTBOX_"))}
    env.update(extra)
    return env


def test_settings_mask_passwords(tmp_path: Path) -> None:
    """Proves ``orch-outbox settings`` shows the database URL with its password masked, as ``celery report``."""
    runner = CliRunner()
    url = "postgresql+psycopg://app:s3cret-pw@127.0.0.1:1/app"
    result = runner.invoke(main, ["settings"], env={"ORCH_OUTBOX_DATABASE_URL": url, "ORCH_OUTBOX_HOME": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output
    assert "postgresql+psycopg://app:**@127.0.0.1:1/app" in result.output


@pytest.mark.parametrize("case", ["unreachable", "no-tables"])
def test_beat_says_why_the_database_cannot_serve(tmp_path: Path, case: str) -> None:
    """Proves a beat whose database is unreachable, or lacks the outbox tables, stops at start-up with one line
    naming the URL (password masked) - and, for missing tables, ``orch-outbox migrate`` - and a non-zero exit,
    instead of starting and failing on every tick."""
    if case == "no-tables":
        require("127.0.0.1", 5432, "PostgreSQL")
        url = PG_URL.replace("://", "://postgres:s3cret-pw@", 1) if "@" not in PG_URL else PG_URL
        prefix = f"nt{uuid.uuid4().hex[:8]}_"
    else:
        url, prefix = "postgresql+psycopg://app:s3cret-pw@127.0.0.1:1/app", "orch_"
    env = _env(ORCH_OUTBOX_DATABASE_URL=url, ORCH_OUTBOX_TABLE_PREFIX=prefix, ORCH_OUTBOX_HOME=str(tmp_path))
    done = subprocess.run(
        [*CELERY, "-A", "orch_outbox", "beat", "--loglevel", "INFO", "-s", str(tmp_path / "schedule")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    lines = [line for line in output.splitlines() if "orch_outbox: " in line]
    assert len(lines) == 1, output
    assert "s3cret-pw" not in output
    if case == "no-tables":
        assert "tables are missing" in lines[0] and "orch-outbox migrate" in lines[0], lines
    else:
        assert "cannot reach the outbox database postgresql+psycopg://app:***@127.0.0.1:1/app" in lines[0], lines


def _record(name: str, msg: str, args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)  # type: ignore[arg-type]


def test_service_task_lines_are_demoted_and_others_kept() -> None:
    """Proves the filter demotes exactly the INFO lines Celery writes for the outbox's own service tasks (beat's
    "Sending due task orch-outbox-relay", a worker's received/succeeded of orch_outbox.relay) and keeps a
    user task's lines at INFO."""
    quiet = QuietServices()
    logging.getLogger("celery.beat").setLevel(logging.INFO)
    service = [
        _record("celery.beat", "Scheduler: Sending due task %s (%s)", ("orch-outbox-relay", "orch_outbox.relay")),
        _record("celery.app.trace", "Task %(name)s[%(id)s] succeeded", {"name": "orch_outbox.rescue", "id": "1"}),
    ]
    for record in service:
        assert quiet.filter(record) is False or record.levelno == logging.DEBUG
        assert record.levelno == logging.DEBUG
    user = _record("celery.beat", "Scheduler: Sending due task %s (%s)", ("nightly", "myapp.report"))
    assert quiet.filter(user) is True and user.levelno == logging.INFO


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("table_prefix", "Bad-Prefix"),
        ("default_target", "bad target!"),
        ("batch_size", 0),
        ("timeout_grace", -1),
        ("poll_interval", "soon"),
        ("retry_backoff", "sometimes"),
    ],
)
def test_a_configuration_error_names_its_setting(key: str, value: object) -> None:
    """Proves a bad setting's error names the setting's key (``outbox_<key>``), whatever check refused it."""
    from orch_outbox import ConfigurationError, Settings

    with pytest.raises(ConfigurationError, match=f"outbox_{key}"):
        Settings.from_sources({f"outbox_{key}": value}, env={})


def test_a_push_into_a_database_without_the_tables_says_to_migrate(tmp_path: Path) -> None:
    """Proves the first contact: pushing before `orch-outbox migrate` raises TablesMissing naming the command to
    run (not a driver error about a table), writes nothing, and works once the tables exist."""
    from celery import Celery

    from orch_outbox import Outbox, TablesMissing

    outbox = Outbox(Celery("first-contact", broker="memory://", set_as_current=False), f"sqlite:///{tmp_path}/x.db")

    @outbox.command
    def hello() -> None: ...

    with pytest.raises(TablesMissing, match="orch-outbox migrate"):
        hello.push(outbox.engine)
    outbox.create_tables()
    assert outbox.get(hello.push(outbox.engine)).status == "pending"
    outbox.engine.dispose()


def test_the_first_push_inside_an_open_sqlite_transaction_does_not_lock_itself(tmp_path: Path) -> None:
    """Proves the check for the tables runs on the caller's connection: on SQLite the first push inside the user's
    own transaction (which holds the write lock) succeeds instead of waiting on itself and failing "locked"."""
    from celery import Celery

    from orch_outbox import Outbox

    outbox = Outbox(Celery("own-tx", broker="memory://", set_as_current=False), f"sqlite:///{tmp_path}/x.db")
    outbox.create_tables()

    @outbox.command
    def hello(i: int) -> None: ...

    with outbox.engine.begin() as conn:
        conn.exec_driver_sql("SELECT 1")
        ids = outbox.push_many(conn, [hello.s(i) for i in range(3)])
    assert [outbox.get(i).status for i in ids] == ["pending"] * 3
    outbox.engine.dispose()


def test_declaring_a_command_leaves_no_folder_behind(tmp_path: Path) -> None:
    """Proves the embedded default makes `.orch_outbox/` only when something is written there: importing a module
    that declares a command on the ready app, in an empty folder, leaves it empty."""
    (tmp_path / "declares.py").write_text("from orch_outbox import command\n\n@command\ndef hi() -> None: ...\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_OUTBOX_", "CELERY_"))}
    done = subprocess.run([sys.executable, "-c", "import declares"], cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["declares.py"]
