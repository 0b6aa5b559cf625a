"""The operator's page through Flask's test client, on PostgreSQL: every page renders what the table holds,
actions need --allow-actions, a CSRF token and a confirmation, and change exactly the rows confirmed."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from orch_outbox import Outbox
from orch_outbox.errors import ConfigurationError
from orch_outbox.executor import attempt_of
from orch_outbox.store import ErrorInfo
from orch_outbox.web import create_app
from orch_outbox.web.security import check_binding

from .support import unique_target

pytestmark = pytest.mark.pg


def _fail(outbox: Outbox, command_id: uuid.UUID, message: str) -> None:
    """Run attempts of a command until it failed for good, each failing with ``message``."""
    for _ in range(10):
        claimed = [d for d in outbox.store.claim(50, 30) if d.id == command_id]
        if not claimed:
            break
        started = outbox.store.start(command_id, claimed[0].attempt, claimed[0].name, "w1@host", 30)
        assert started is not None
        outbox.settler.failed(attempt_of(started), "failure", ErrorInfo("ValueError", message))
    assert outbox.get(command_id).status == "failed"


@pytest.fixture
def filled(make_outbox: Callable[..., Outbox]) -> tuple[Outbox, dict[str, Any]]:
    outbox = make_outbox()
    target = unique_target("web")

    @outbox.command(target=target, retries=1)
    def import_feed(url: str) -> None: ...

    @outbox.command(target=target, hide_input=True)
    def secret(password: str) -> None: ...

    broken = []
    for i in range(3):  # one at a time: each claim takes every due row
        broken.append(import_feed.push(outbox.engine, f"https://example.invalid/{i}"))
        _fail(outbox, broken[-1], f"no feed at {broken[-1]}")
    waiting = import_feed.push(outbox.engine, "https://example.org/ok")
    hidden = secret.push(outbox.engine, "hunter2")
    return outbox, {"target": target, "broken": broken, "waiting": waiting, "hidden": hidden}


def _csrf(client: Any, path: str) -> str:
    page = client.get(path)
    match = re.search(r'name="csrf" value="([^"]+)"', page.get_data(as_text=True))
    assert match, "the page carries a CSRF token"
    return match.group(1)


def test_every_page_renders_what_the_table_holds(filled: tuple[Outbox, dict[str, Any]]) -> None:
    """Proves the read pages: overview counts by target (due now apart from later), commands filtered by status and by
    text in the error with the total, one command with both attempts and its error, the hidden input not shown,
    batches, schedules, workers; a read-only page refuses actions (403)."""
    outbox, rows = filled
    client = create_app(outbox).test_client()
    overview = client.get("/").get_data(as_text=True)
    assert rows["target"] in overview
    failed = client.get(f"/commands?status=failed&target={rows['target']}").get_data(as_text=True)
    assert "3 commands" in failed and failed.count("no feed at") == 3
    one = client.get(f"/commands?error={rows['broken'][1]}").get_data(as_text=True)
    assert "1 command," in one
    detail = client.get(f"/commands/{rows['broken'][0]}").get_data(as_text=True)
    assert detail.count("ValueError: no feed at") == 2  # attempt 1 and attempt 2 in the history
    secret = client.get(f"/commands/{rows['hidden']}").get_data(as_text=True)
    assert "hunter2" not in secret and "hidden" in secret
    for path in ("/batches", "/schedules", "/workers", "/dead"):
        assert client.get(path, follow_redirects=True).status_code == 200
    assert client.get("/commands/not-an-id").status_code == 404
    assert client.get("/commands?status=sleeping").status_code == 400
    token = _csrf(client, "/commands")
    refused = client.post("/actions", data={"csrf": token, "action": "requeue", "ids": str(rows["broken"][0])})
    assert refused.status_code == 403
    assert outbox.get(rows["broken"][0]).status == "failed"


def test_a_bulk_requeue_changes_exactly_the_rows_it_confirmed(filled: tuple[Outbox, dict[str, Any]]) -> None:
    """Proves the two-step bulk action: ticking two failed rows and asking to requeue answers a confirmation that names
    exactly those two; confirming requeues them and only them. "Every row matching the filter" confirms the count
    that matched. A POST without the CSRF token is refused."""
    outbox, rows = filled
    client = create_app(outbox, allow_actions=True).test_client()
    token = _csrf(client, "/commands")
    chosen = rows["broken"][:2]
    asked = client.post("/actions", data={"csrf": token, "action": "requeue", "ids": [str(c) for c in chosen]})
    page = asked.get_data(as_text=True)
    assert "Requeue 2 commands?" in page and all(str(c) in page for c in chosen)
    assert all(outbox.get(c).status == "failed" for c in chosen)  # nothing changed before the confirmation
    done = client.post(
        "/actions", data={"csrf": token, "action": "requeue", "confirm": "1", "ids": [str(c) for c in chosen]}
    )
    assert "Requeue: 2 of 2 done" in done.get_data(as_text=True)
    assert [outbox.get(c).status for c in rows["broken"]] == ["pending", "pending", "failed"]
    matching = client.post(
        "/actions", data={"csrf": token, "action": "purge", "all": "1", "status": "failed", "target": rows["target"]}
    )
    assert "Delete 1 command?" in matching.get_data(as_text=True)
    assert client.post("/actions", data={"action": "requeue", "ids": str(rows["broken"][2])}).status_code == 403


def test_beyond_loopback_the_page_needs_a_token(filled: tuple[Outbox, dict[str, Any]]) -> None:
    """Proves the page refuses to listen beyond loopback without a token, and with one asks every request for it."""
    outbox, _ = filled
    with pytest.raises(ConfigurationError):
        check_binding("0.0.0.0", None)
    check_binding("127.0.0.1", None)
    client = create_app(outbox, token="s3cret").test_client()
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"Authorization": "Basic b3BzOnMzY3JldA=="}).status_code == 200  # ops:s3cret
