"""First contact with `orch-outbox`: which outbox and database `migrate` and `status` used, said on stderr, and
the hint when no ``-A`` was given but a module of the current directory builds its own ``Outbox(...)``.

Runs through click's runner in a tmp directory on the embedded default (SQLite), no servers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from orch_outbox import default as default_module
from orch_outbox.cli import main
from orch_outbox.cli.base import outboxes_here

#: A module that builds its own outbox, and fails loudly if anything imports it (the scan only reads its text).
OWN_OUTBOX = """\
from celery import Celery
from orch_outbox import Outbox

app = Celery("shop")
shop_outbox: Outbox = Outbox(app, "sqlite:///shop.sqlite3")
raise SystemExit("myapp.py was imported; the hint must come from a text scan")
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory, a fresh default outbox whose embedded default lives in it, no celeryconfig."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(default_module, "_default", None)
    monkeypatch.delitem(sys.modules, "celeryconfig", raising=False)
    # no celeryconfig anywhere on the path (the checkout's own must not be found from here)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".") / "celeryconfig.py").exists()])
    for key in ("ORCH_OUTBOX_APP", "ORCH_OUTBOX_DATABASE_URL", "ORCH_OUTBOX_CONFIG_MODULE", "CELERY_BROKER_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ORCH_OUTBOX_HOME", str(tmp_path / "home"))
    return tmp_path


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_migrate_without_app_names_the_default_outbox_and_points_at_the_module_that_builds_one(folder: Path) -> None:
    """Proves `orch-outbox migrate` with no -A migrates the embedded default, says so on stderr with its URL, and,
    as myapp.py builds `shop_outbox = Outbox(...)`, says to pass `-A myapp:shop_outbox` - without importing myapp;
    stdout keeps only the migration's own line."""
    (folder / "myapp.py").write_text(OWN_OUTBOX)
    done = run("migrate")
    assert done.exit_code == 0, done.output
    url = f"sqlite:///{folder / 'home' / 'outbox.sqlite3'}"
    assert done.stderr.strip() == (
        f"using the default outbox ({url}); for the outbox in myapp.py pass -A myapp:shop_outbox"
    ), done.stderr
    assert done.stdout.startswith("outbox tables with prefix 'orch_' are at revision head"), done.stdout
    assert "myapp" not in sys.modules


def test_status_says_which_outbox_on_stderr_and_keeps_json_on_stdout(folder: Path) -> None:
    """Proves `orch-outbox status --json` prints only the JSON on stdout and the outbox it read on stderr; with no
    module building an outbox here there is no hint."""
    assert run("migrate").exit_code == 0
    done = run("status", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {}
    url = f"sqlite:///{folder / 'home' / 'outbox.sqlite3'}"
    assert done.stderr.strip() == f"using the default outbox ({url})", done.stderr


def test_a_named_outbox_is_said_with_its_password_hidden_and_without_a_hint(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves `orch-outbox -A mod:outbox migrate --sql` names the outbox given and its URL with the password
    hidden (nowhere in the output), and gives no hint: -A says which outbox the user means."""
    name = "first_contact_app"
    (folder / f"{name}.py").write_text(
        "from celery import Celery\nfrom orch_outbox import Outbox\n\n"
        f'outbox = Outbox(Celery("{name}", set_as_current=False), "postgresql+psycopg://app:s3cret@127.0.0.1:1/app")\n'
    )
    (folder / "myapp.py").write_text(OWN_OUTBOX)
    monkeypatch.delitem(sys.modules, name, raising=False)
    done = run("-A", f"{name}:outbox", "migrate", "--sql")
    assert done.exit_code == 0, done.output
    assert done.stderr.strip() == f"using the outbox {name}:outbox (postgresql+psycopg://app:***@127.0.0.1:1/app)"
    assert "s3cret" not in done.output
    sys.modules.pop(name, None)


def test_the_scan_reads_text_only(folder: Path) -> None:
    """Proves the scan finds each `*.py` of the folder that builds an `Outbox(` (annotated, dotted or not
    assigned at all: then `outbox`) and skips celeryconfig.py, files that are not module names, other files and
    subfolders; nothing is imported."""
    (folder / "a_app.py").write_text("import orch_outbox\nbox = orch_outbox.Outbox(app)\n")
    (folder / "b_app.py").write_text(OWN_OUTBOX)
    (folder / "c_app.py").write_text("register(Outbox(app))\n")
    (folder / "d_app.py").write_text("from orch_outbox import command\n")
    (folder / "celeryconfig.py").write_text("outbox = Outbox(app)\n")
    (folder / "not-a-module.py").write_text("outbox = Outbox(app)\n")
    (folder / "pkg").mkdir()
    (folder / "pkg" / "inner.py").write_text("outbox = Outbox(app)\n")
    assert outboxes_here(str(folder)) == ["a_app:box", "b_app:shop_outbox", "c_app:outbox"]
    assert not {"a_app", "b_app", "c_app"} & set(sys.modules)
