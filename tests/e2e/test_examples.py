"""The runnable examples (examples/*), each run by the one command its README documents, exactly as written.

The command is read from the README (its only ``bash`` block, one line), so the README cannot rot. Each example
folder is copied into a temp directory laid out as a checkout (``<tmp>/examples/<name>``) and the command runs
from there, so nothing is written into the checkout; the embedded default lives in the temp directory, and the
PostgreSQL runs get a scratch database and a RabbitMQ queue of their own, both removed afterwards. Each run's
outcome is then read again from its database by the test, not only from what the script printed.

The FastAPI app is also driven in-process, with httpx's ``ASGITransport``, against a real worker and beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox

from conftest import AMQP_URL, PG_URL, make_app, require
from support.broker import delete_queue
from support.procs import (
    Proc,
    beat_argv,
    check_alive,
    children_of,
    clean_env,
    orch_outbox_cli,
    run_command,
    spawn,
    stop_all,
    tail,
    worker_argv,
)
from support.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
#: The longest one example's command may take (its own waits are bounded below this).
RUN_TIMEOUT = 200.0
#: The longest wait for a command of the in-process FastAPI test.
WAIT = 60.0


# -- the documented command ---------------------------------------------------------------------------


def one_command(example: str) -> str:
    """The one command an example's README documents: its only ``bash`` block, holding one line."""
    text = (EXAMPLES / example / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert len(blocks) == 1, f"examples/{example}/README.md has {len(blocks)} bash blocks, not one"
    lines = [line for line in blocks[0].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == 1, f"examples/{example}/README.md's bash block is not one command: {lines}"
    return lines[0]


def checkout(tmp_path: Path, example: str) -> Path:
    """A temp directory laid out as a checkout's root, holding a copy of the example; returns that root."""
    root = tmp_path / "checkout"
    shutil.copytree(
        EXAMPLES / example, root / "examples" / example, ignore=shutil.ignore_patterns("__pycache__", ".orch_outbox")
    )
    return root


def run_documented(
    example: str, tmp_path: Path, env: dict[str, str], edit: Callable[[Path], None] | None = None, exit_code: int = 0
) -> str:
    """Run the example's README command from a checkout copy (``edit``: changed first, given the copy's folder), as
    a user's shell would (``python`` is this virtualenv's); asserts its exit code and returns the output. A run
    that outlives :data:`RUN_TIMEOUT` is sent SIGTERM (the scripts stop their worker and beat then), and whatever
    it started is killed."""
    command = one_command(example)
    root = checkout(tmp_path, example)
    if edit is not None:
        edit(root / "examples" / example)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    log = tmp_path / f"{example}.log"
    proc = spawn(example, ["bash", "-e", "-c", command], root, log, env=clean_env({**env, "PATH": path}))
    started: dict[int, str] = {}
    try:
        wait_until(lambda: _watch(proc, started), RUN_TIMEOUT, 0.2, lambda: f"{command} to exit\n{tail(proc.output())}")
    finally:
        _stop_tree(proc, started)
    output = proc.output()
    assert proc.returncode == exit_code, f"$ {command}\n[exit {proc.returncode}, not {exit_code}]\n{output}"
    return output


def _identity(pid: int) -> tuple[int, str] | None:
    """A live process's group and start time (from /proc), which tell it apart from a later one of the same pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[2]), fields[19]


def _watch(proc: Proc, started: dict[int, str]) -> bool:
    """True once the run exited; meanwhile note the process groups it started (its worker and beat run in
    sessions of their own) with their start times, so that they can be killed if the run itself has to be."""
    for child in children_of(proc.pid):
        for pid in (child, *children_of(child)):
            found = _identity(pid)
            if found is not None and found[0] == pid and pid != proc.pid:
                started.setdefault(pid, found[1])
    return not proc.alive()


def _stop_tree(proc: Proc, started: dict[int, str]) -> None:
    """Stop the run (SIGTERM, then SIGKILL of its group), then kill what is left of the groups it started - only
    those whose leader is still the very process noted (same pid and start time)."""
    proc.stop()
    for pid, start_time in started.items():
        if _identity(pid) == (pid, start_time):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


# -- servers ----------------------------------------------------------------------------------------------


@pytest.fixture
def scratch_db() -> Iterator[str]:
    """A PostgreSQL database of this test's own (its URL), dropped afterwards."""
    require("127.0.0.1", 5432, "PostgreSQL")
    name = f"examples_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def queue() -> Iterator[str]:
    """A RabbitMQ queue name of this test's own, deleted afterwards."""
    require("127.0.0.1", 5672, "RabbitMQ")
    name = f"examples-{uuid.uuid4().hex[:10]}"
    yield name
    delete_queue(AMQP_URL, name)


def reading(url: str) -> Outbox:
    """An outbox on ``url`` for reading a run's commands back (an app of its own on the in-memory broker)."""
    return Outbox(make_app(), url)


def summary(outbox: Outbox) -> list[tuple[str, str]]:
    return sorted((c.name, c.status) for c in outbox.find(limit=1000))


# -- the documented commands ----------------------------------------------------------------------------


def test_quickstart_runs_as_its_readme_says(tmp_path: Path) -> None:
    """Proves `python examples/quickstart/run.py`, run as its README says on the embedded default (no servers),
    exits 0 after migrating, starting a worker and beat, pushing and seeing every greeting and the shout chained
    from it completed; `orch-outbox migrate` says which outbox it used; and the SQLite file it leaves holds
    exactly those four commands, completed - the greeting whose transaction rolled back is not there."""
    home = tmp_path / "home"
    output = run_documented("quickstart", tmp_path, {"ORCH_OUTBOX_HOME": str(home)})
    assert "quickstart: every command completed" in output
    assert "then shout completed: 'HELLO ADA!'" in output and "greet('nobody') stored: False" in output
    assert f"using the default outbox (sqlite:///{home / 'outbox.sqlite3'}" in output
    outbox = reading(f"sqlite:///{home / 'outbox.sqlite3'}")
    assert summary(outbox) == [("greet", "completed")] * 2 + [("shout", "completed")] * 2
    assert sorted(c.input["name"] for c in outbox.find(name="greet")) == ["ada", "grace"]


def test_quickstart_fails_when_its_commands_do(tmp_path: Path) -> None:
    """Proves the quick start's exit 0 means something: with greet raising on the worker (no retries), the same
    documented command waits for the greetings to end, reports them failed and exits 1."""

    def break_greet(folder: Path) -> None:
        module = folder / "commands.py"
        text = module.read_text().replace('return f"hello {name}"', 'raise ValueError(f"no greeting for {name}")')
        assert "raise ValueError" in text
        module.write_text(text)

    env = {"ORCH_OUTBOX_HOME": str(tmp_path / "home"), "ORCH_OUTBOX_DEFAULT_RETRIES": "0"}
    output = run_documented("quickstart", tmp_path, env, edit=break_greet, exit_code=1)
    assert "greet('ada') failed" in output and "quickstart: FAILED" in output
    assert "every command completed" not in output


@pytest.mark.parametrize("where", ["embedded", "postgres"])
def test_canvas_runs_as_its_readme_says(tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    """Proves `python examples/canvas/run.py`, run as its README says - on the embedded default, and with the
    environment naming a scratch PostgreSQL database, RabbitMQ and a queue of its own - exits 0 once the chain,
    the chord, the group and the tenant's batch (with a member appended while the tenant was paused) all
    completed with the expected outputs; the database then holds every step, each completed."""
    home = tmp_path / "home"
    env = {"ORCH_OUTBOX_HOME": str(home)}
    url = f"sqlite:///{home / 'outbox.sqlite3'}"
    if where == "postgres":
        url = request.getfixturevalue("scratch_db")
        env |= {"ORCH_OUTBOX_DATABASE_URL": url, "CELERY_BROKER_URL": AMQP_URL}
        env["CANVAS_QUEUE"] = request.getfixturevalue("queue")
    output = run_documented("canvas", tmp_path, env)
    assert "canvas: every canvas completed" in output
    assert "canvas.count_words completed 5" in output
    assert "'published 3: a@2x.png, b@2x.png, c@2x.png'" in output
    assert "'sent to ada (completed); sent to grace (completed); sent to linus (completed)'" in output
    steps = {"fetch": 1, "parse": 1, "canvas.count_words": 1, "resize": 5, "publish": 1, "send": 3, "report": 1}
    assert summary(reading(url)) == sorted((n, "completed") for n, k in steps.items() for _ in range(k))


def test_fastapi_example_runs_as_its_readme_says(tmp_path: Path, scratch_db: str, queue: str) -> None:
    """Proves `python examples/fastapi_sqlalchemy/run.py`, run as its README says with DATABASE_URL, BROKER_URL
    and ORDERS_QUEUE in its environment, exits 0: both orders (sync and async endpoint) confirmed by the worker,
    and the two orders refused after their push left nothing; read back from the database, there are exactly
    two orders, both confirmed, and two confirm_order commands, both completed."""
    output = run_documented(
        "fastapi_sqlalchemy", tmp_path, {"DATABASE_URL": scratch_db, "BROKER_URL": AMQP_URL, "ORDERS_QUEUE": queue}
    )
    assert "fastapi_sqlalchemy: every order confirmed" in output
    assert output.count(": 409 ") == 2 and output.count(": 201 ") == 2
    engine = sa.create_engine(scratch_db)
    try:
        with engine.connect() as conn:
            orders = conn.execute(sa.text("SELECT quantity, status FROM orders ORDER BY id")).all()
    finally:
        engine.dispose()
    assert [tuple(o) for o in orders] == [(2, "confirmed"), (2, "confirmed")]
    assert summary(reading(scratch_db)) == [("confirm_order", "completed")] * 2


# -- the FastAPI app in-process ------------------------------------------------------------------------


@pytest.fixture
def shop(tmp_path: Path, scratch_db: str, queue: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The example's ``shop`` module imported from a copy, on the scratch database and queue; its tables made
    (``orch-outbox -A shop:outbox migrate``); a real ``celery -A shop`` worker and beat running in the copy."""
    from celery import current_app

    folder = checkout(tmp_path, "fastapi_sqlalchemy") / "examples" / "fastapi_sqlalchemy"
    settings = {"DATABASE_URL": scratch_db, "BROKER_URL": AMQP_URL, "ORDERS_QUEUE": queue}
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(folder))
    for name in ("shop", "shopconfig"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    previous_app = current_app._get_current_object()
    import shop as module  # type: ignore[import-not-found]

    procs: list[Proc] = []
    try:
        module.Base.metadata.create_all(module.engine)
        migrated = run_command([*orch_outbox_cli(), "-A", "shop:outbox", "migrate"], folder, 60, clean_env(settings))
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert "using the outbox shop:outbox" in migrated.stderr
        for role, argv in (("worker", worker_argv(queue, "shop")), ("beat", beat_argv("-s", str(tmp_path / "beat")))):
            argv[argv.index("orch_outbox")] = "shop"  # `celery -A shop ...`: the example's own app
            procs.append(spawn(role, argv, folder, tmp_path / f"{role}.log", env=clean_env(settings)))
        module.procs = procs
        yield module
    finally:
        stop_all(procs)
        module.engine.dispose()
        module.outbox.close()
        previous_app.set_current()


def _logs(procs: list[Proc]) -> str:
    return "".join(f"\n--- {p.describe()} ---\n{tail(p.output(), 60)}" for p in procs)


def test_fastapi_app_in_process_commits_and_rollbacks(shop: Any) -> None:
    """Proves, driving the FastAPI app in-process with httpx's ASGITransport against a real worker subprocess:
    a POST that commits (sync Session, and AsyncSession with push_async) stores the order and its command, which
    the worker completes (the order is then confirmed); a POST that fails its stock check *after* pushing is
    refused with 409 and leaves no order and no command, on either endpoint."""
    import httpx

    outbox = shop.outbox

    def completed(command_id: str) -> Any:
        check_alive(shop.procs, f"command {command_id} to complete", lambda: _logs(shop.procs))
        info = outbox.get(command_id)
        return info if info.status in ("completed", "failed", "canceled", "expired") else None

    async def drive() -> list[dict[str, Any]]:
        transport = httpx.ASGITransport(app=shop.api)
        async with (
            shop.api.router.lifespan_context(shop.api),
            httpx.AsyncClient(transport=transport, base_url="http://shop") as client,
        ):
            placed = []
            for path in ("/orders", "/async/orders"):
                response = await client.post(path, json={"item": f"ok{path}", "quantity": 3})
                assert response.status_code == 201, response.text
                placed.append({**response.json(), "item": f"ok{path}"})
                refused = await client.post(path, json={"item": f"refused{path}", "quantity": shop.STOCK + 1})
                assert refused.status_code == 409, refused.text
                assert refused.json() == {"detail": f"only {shop.STOCK} refused{path} in stock"}
            for done in placed:
                info = wait_until(lambda d=done: completed(d["command_id"]), WAIT, 0.1, "the command to complete")
                assert info.status == "completed", info
                assert info.output == f"order {done['order_id']}: 3 x {done['item']} confirmed"
                shown = await client.get(f"/orders/{done['order_id']}")
                assert shown.json()["status"] == "confirmed", shown.text
            return placed

    placed = asyncio.run(drive())
    with shop.engine.connect() as conn:
        items = conn.execute(sa.text("SELECT item, status FROM orders ORDER BY id")).all()
    assert [tuple(i) for i in items] == [("ok/orders", "confirmed"), ("ok/async/orders", "confirmed")]
    commands = outbox.find(name="confirm_order")
    assert sorted(str(c.id) for c in commands) == sorted(p["command_id"] for p in placed)
    assert sorted(c.input["order_id"] for c in commands) == sorted(p["order_id"] for p in placed)
    assert outbox.count() == 2  # nothing else was ever pushed: the refused orders' commands rolled back with them


def test_example_readmes_link_to_files_that_exist() -> None:
    """Proves every relative link of the main README, docs/*.md and the examples' READMEs names a file or folder
    that exists, so the pointers to examples/ and the docs stay valid."""
    root = EXAMPLES.parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted(EXAMPLES.glob("*/README.md"))]
    broken = []
    for page in pages:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in link and not link.startswith("mailto:") and not (page.parent / link).exists():
                broken.append(f"{page.relative_to(root)}: {link}")
    assert not broken, broken
    assert "(examples/)" in (root / "README.md").read_text()
