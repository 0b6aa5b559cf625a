"""``orch-outbox demo``: the whole loop on the embedded default, in one process.

A SQLite file and kombu's filesystem broker in a folder of their own; a relay and a
Celery worker (threads pool) in this process. It pushes five scenarios inside
SQLAlchemy transactions, plus one push whose transaction rolls back, waits until every
command is final, and prints the table of final states.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy.orm import Session

from .context import current
from .default import base_config, embedded_broker
from .outbox import Outbox
from .render import table
from .task import Outcome
from .testing import drain

QUEUE = "demo"


@dataclass
class Order:
    id: int
    amount: Decimal


@dataclass
class Receipt:
    order_id: int
    charged: Decimal
    reference: str


def build(outbox: Outbox) -> dict[str, Any]:
    """Declare the demo's commands on ``outbox``."""
    command = outbox.command

    @command(target=QUEUE)
    def charge_card(order: Order) -> Receipt:
        return Receipt(order.id, order.amount, f"ch_{order.id:04d}")

    @command(target=QUEUE)
    def send_receipt(receipt: Receipt) -> str:
        return f"receipt {receipt.reference} for {receipt.charged} sent"

    @charge_card.then
    def _email_receipt(outcome: Outcome) -> list[Any]:
        return [send_receipt.s(outcome.output)]

    @command(target=QUEUE, retries=3)
    def fetch_rates(currency: str) -> dict[str, float]:
        if current().attempt == 1:
            raise ConnectionError("rates service unreachable (first attempt)")
        return {currency: 1.08}

    @command(target=QUEUE, retries=1)
    def import_feed(url: str) -> int:
        raise ValueError(f"{url} is not a valid feed")

    @command(target=QUEUE)
    def alert_ops(message: str) -> str:
        return f"paged on-call: {message}"

    @import_feed.if_failed
    def _page(outcome: Outcome) -> list[Any]:
        assert outcome.error is not None
        return [alert_ops.s(f"import_feed failed: {outcome.error.message}")]

    @command(target=QUEUE, timeout=0.5, retries=0)
    def render_report(pages: int) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # far longer than the 0.5 s timeout
            pass
        return "never"

    @command(target=QUEUE)
    def send_newsletter(issue: int) -> str:
        return f"issue {issue} sent"

    @command(target=QUEUE)
    def note_cancellation(issue: int) -> str:
        return f"newsletter {issue} canceled"

    @send_newsletter.if_canceled
    def _note(outcome: Outcome) -> list[Any]:
        return [note_cancellation.s(outcome.input["issue"])]

    return locals()


def run(home: str | None = None, out: Any = print) -> int:
    """Run the demo; returns 0 when every scenario ended as expected."""
    home = home or tempfile.mkdtemp(prefix="orch-outbox-demo-")
    app = Celery("orch_outbox_demo", set_as_current=False)
    app.config_from_object({**base_config(), **embedded_broker(home)})
    outbox = Outbox(app, f"sqlite:///{home}/outbox.sqlite3", retry_backoff="fixed", retry_backoff_base=0.2)
    outbox.create_tables()
    c = build(outbox)

    with Session(outbox.engine) as session, session.begin():
        c["charge_card"].push(session, Order(42, Decimal("19.90")))
        c["fetch_rates"].push(session, "EUR")
        c["import_feed"].push(session, "https://example.invalid/feed.xml")
        c["render_report"].push(session, 12)
        newsletter = c["send_newsletter"].options(delay=3600).push(session, 7)
    with Session(outbox.engine) as session, session.begin():
        c["charge_card"].push(session, Order(43, Decimal("5.00")))
        session.rollback()  # this command never existed
    outbox.cancel(newsletter)

    out(f"demo: SQLite and the filesystem broker live in {home}")
    with start_worker(
        app,
        pool="threads",
        concurrency=2,
        queues=[QUEUE],
        perform_ping_check=False,
        loglevel="ERROR",
        shutdown_timeout=5,
    ):
        drain(outbox, timeout=60)

    rows = outbox.store.counts()
    infos = _all(outbox)
    out(_table(infos))
    out(f"\n{sum(n for _t, _s, n in rows)} commands, all final; the rolled-back order 43 was never stored.")
    expected = {
        "charge_card": "completed",
        "send_receipt": "completed",
        "fetch_rates": "completed",
        "import_feed": "failed",
        "alert_ops": "completed",
        "render_report": "failed",
        "send_newsletter": "canceled",
        "note_cancellation": "completed",
    }
    got = {i.name: i.status for i in infos}
    return 0 if got == expected and len(infos) == len(expected) else 1


def _all(outbox: Outbox) -> list[Any]:
    return sorted(outbox.find(limit=1000), key=lambda i: (i.created_at, i.id))


def _table(infos: list[Any]) -> str:
    by_id = {i.id: i for i in infos}
    rows = []
    for info in infos:
        if info.status == "completed":
            detail = str(info.output)
        elif info.error:
            detail = f"{info.error.type}: {info.error.message}"
        else:
            detail = ""
        parent = by_id[info.parent_id].name if info.parent_id in by_id else ""
        rows.append((info.name, info.status, info.outcome or "", str(info.attempt), parent, detail[:60]))
    return table(("command", "status", "outcome", "attempts", "chained from", "output / error"), rows)
