"""The operator's page in a real browser: ``orch-outbox web`` as a subprocess, Debian's Chromium driven by
Playwright's Python API (no browser download). Filter → tick → requeue → confirm, then the database; a
read-only page; a screenshot of each page kept in ``tests/artifacts/``."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox
from orch_outbox.executor import attempt_of
from orch_outbox.store import ErrorInfo

from conftest import PG_URL, make_app, unique_prefix
from support.procs import clean_env, free_port, orch_outbox_cli
from support.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
APP = """
from celery import Celery
from orch_outbox import Outbox

app = Celery("web-e2e", broker="memory://")
outbox = Outbox(app, {url!r}, table_prefix={prefix!r})


@outbox.command(target={target!r}, retries=1)
def import_feed(url: str) -> None: ...
"""


@pytest.fixture
def project(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Three failed commands and one pending, on PostgreSQL, and the app module the page's process imports."""
    prefix, target = unique_prefix() + "web_", f"feeds-{uuid.uuid4().hex[:8]}"
    outbox = Outbox(make_app(), sa.create_engine(PG_URL), table_prefix=prefix, retry_backoff="fixed",
                    retry_backoff_base=0.0)  # fmt: skip

    @outbox.command(target=target, retries=1)
    def import_feed(url: str) -> None: ...

    outbox.create_tables()
    failed = []
    for i in range(3):
        failed.append(import_feed.push(outbox.engine, f"https://example.invalid/{i}.xml"))
        for _ in range(2):
            (claimed,) = outbox.store.claim(10, 30)
            started = outbox.store.start(claimed.id, claimed.attempt, "import_feed", "w1@host", 30)
            assert started is not None
            outbox.settler.failed(attempt_of(started), "failure", ErrorInfo("ValueError", f"not a feed ({i})"))
    pending = import_feed.push(outbox.engine, "https://example.org/ok.xml")
    (tmp_path / "web_app.py").write_text(APP.format(url=PG_URL, prefix=prefix, target=target))
    yield {"outbox": outbox, "failed": failed, "pending": pending, "root": tmp_path, "target": target}
    outbox.store.drop_all()
    outbox.close()


def _serve(root: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = clean_env({"PYTHONPATH": str(root)})
    log = root / f"web-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*orch_outbox_cli(), "-A", "web_app:outbox", "web", "--port", str(port), *extra],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _answers(base) or proc.poll() is not None, 30, describe="orch-outbox web to answer")
    assert proc.poll() is None, f"orch-outbox web exited:\n{log.read_text()}"
    return proc, base


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/", timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_filter_tick_requeue_confirm_in_a_real_browser(project: dict[str, Any]) -> None:
    """Proves what an operator does: filters the failed commands, ticks two, asks to requeue, reads a confirmation
    naming exactly two rows, confirms — and exactly those two are pending in the database, the third still failed.
    A page started without --allow-actions shows no action and refuses a POST."""
    from playwright.sync_api import sync_playwright

    outbox: Outbox = project["outbox"]
    ARTIFACTS.mkdir(exist_ok=True)
    server, base = _serve(project["root"], "--allow-actions")
    readonly, readonly_base = _serve(project["root"])
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{base}/")
            page.screenshot(path=str(ARTIFACTS / "web-overview.png"), full_page=True)
            page.goto(f"{base}/commands")
            page.select_option("select[name=status]", "failed")
            page.fill("input[name=target]", project["target"])
            page.click("#filter")
            assert "3 commands" in page.inner_text("#total")
            page.screenshot(path=str(ARTIFACTS / "web-commands.png"), full_page=True)
            chosen = [str(c) for c in project["failed"][:2]]
            for cid in chosen:
                page.check(f"input[name=ids][value='{cid}']")
            page.click("button[value=requeue]")
            assert "exactly 2 rows" in page.inner_text("#confirm-count")
            assert [outbox.get(c).status for c in project["failed"]] == ["failed"] * 3
            page.screenshot(path=str(ARTIFACTS / "web-confirm.png"), full_page=True)
            page.click("#confirm")
            assert "2 of 2 done" in page.inner_text("#done")
            assert [outbox.get(c).status for c in project["failed"]] == ["pending", "pending", "failed"]
            page.goto(f"{base}/commands/{project['failed'][2]}")
            assert page.inner_text("#attempts").count("ValueError") == 2
            page.screenshot(path=str(ARTIFACTS / "web-command.png"), full_page=True)
            for name in ("batches", "schedules", "workers"):
                page.goto(f"{base}/{name}")
                page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)
            page.goto(f"{readonly_base}/commands?status=failed")
            assert page.locator("input[name=ids]").count() == 0
            status = page.evaluate(
                """async (id) => {
                    const form = new URLSearchParams({action: "requeue", ids: id, confirm: "1"});
                    return (await fetch("/actions", {method: "POST", body: form})).status;
                }""",
                str(project["failed"][2]),
            )
            assert status == 403
            browser.close()
    finally:
        for proc in (server, readonly):
            proc.terminate()
            proc.wait(10)
    assert outbox.get(project["failed"][2]).status == "failed"
