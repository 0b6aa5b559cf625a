"""Bulk pushes through COPY store exactly what one-by-one pushes store.

From 50 rows a push goes to PostgreSQL as COPY text built by the outbox (tab-separated,
with COPY's own escapes). These tests put the characters that text format gives a
meaning to (tab, newline, carriage return, backslash, ``\\N``) and non-ASCII text into
every kind of column a push writes, and compare the rows with the ones a plain INSERT
wrote.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from orch_outbox import Outbox
from orch_outbox.errors import InvalidInput
from orch_outbox.store.push import COPY_MIN_ROWS

from .support import unique_target

pytestmark = pytest.mark.pg

TENANT = "\\N\tacme\\corp"  # COPY would read an unescaped \N as NULL
TRICKY = ["tab\there", "line\nbreak", "cr\rhere", "back\\slash", "\\N", "é ü 漢字 \u2028", "quote \" and '", ""]


def _rows(outbox: Outbox, ids: list[Any]) -> list[dict[str, Any]]:
    keep = ("name", "target", "status", "input", "priority", "timeout", "retries", "retries_left", "tenant")
    return [{k: getattr(outbox.get(i), k, None) for k in keep} for i in ids]


@pytest.fixture
def echo(make_outbox: Callable[..., Outbox]) -> Any:
    outbox = make_outbox()

    @outbox.command(target=unique_target("bulk"), retries=2, timeout=7.5, priority=3)
    def echo(text: str, payload: dict[str, Any]) -> None: ...

    return echo


def _pushed_by_insert(outbox: Outbox, calls: list[Any]) -> list[Any]:
    """The calls pushed one by one, fewer than COPY_MIN_ROWS to a transaction: their rows go through INSERT."""
    ids = []
    for start in range(0, len(calls), COPY_MIN_ROWS - 1):
        with Session(outbox.engine) as session, session.begin():
            ids.extend(outbox.push(session, call) for call in calls[start : start + COPY_MIN_ROWS - 1])
    return ids


def test_copy_stores_tricky_text_exactly_as_an_insert(echo: Any) -> None:
    """Proves the COPY text escapes: 64 rows with tabs, newlines, backslashes, ``\\N`` and non-ASCII in
    their arguments read back equal to the same calls pushed one by one (INSERT)."""
    outbox: Outbox = echo.outbox
    calls = [echo.s(text, {"k\t": text, "n": i, "x": [text, None, 1.5]}) for i, text in enumerate(TRICKY * 8)]
    with Session(outbox.engine) as session, session.begin():
        bulk = outbox.push_many(session, calls)
    single = _pushed_by_insert(outbox, calls)
    assert len(bulk) == len(calls) == 64
    assert _rows(outbox, bulk) == _rows(outbox, single)
    assert [outbox.get(i).input["text"] for i in bulk] == TRICKY * 8
    assert bulk == sorted(bulk), "ids of one push are in push order"


def test_copy_keeps_per_call_options_and_delays(echo: Any) -> None:
    """Proves rows sharing a template keep their own options: target, priority, tenant-free delay and
    scheduled time differ per call and come back as given (a template cache keyed wrongly would mix them)."""
    outbox: Outbox = echo.outbox
    other = unique_target("bulk-other")
    at = dt.datetime(2031, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    calls = []
    for i in range(60):
        sig = echo.s(f"t{i}", {})
        if i % 3 == 1:
            sig = sig.set(target=other, priority=9)
        elif i % 3 == 2:
            sig = sig.set(scheduled_at=at)
        calls.append(sig)
    with Session(outbox.engine) as session, session.begin():
        ids = outbox.push_many(session, calls)
    rows = [outbox.get(i) for i in ids]
    assert [r.input["text"] for r in rows] == [f"t{i}" for i in range(60)]
    assert {r.target for r in rows[1::3]} == {other} and {r.priority for r in rows[1::3]} == {9}
    assert {r.target for r in rows[0::3]} == {echo.outbox_target} and {r.priority for r in rows[0::3]} == {3}
    assert {r.scheduled_at for r in rows[2::3]} == {at}
    assert all(r.scheduled_at < at for r in rows[0::3])


def test_many_pushes_of_one_transaction_go_through_copy_each_with_its_own_values(echo: Any) -> None:
    """Proves the pushes of one transaction, written at its commit through COPY (from COPY_MIN_ROWS rows),
    store each push's own values: 60 pushes whose target, priority, tenant, retries, timeout and due time
    vary in a pattern (the COPY text renders a value once per column and reuses it: a reuse keyed wrongly
    would mix them) read back equal to the same pushes written through INSERT."""
    outbox: Outbox = echo.outbox
    other = unique_target("held-other")
    at = dt.datetime(2031, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    calls = []
    for i in range(60):
        sig = echo.s(TRICKY[i % len(TRICKY)], {"i": i})
        if i % 4 == 1:
            sig = sig.set(target=other, priority=1, retries=1)
        elif i % 4 == 2:
            sig = sig.set(tenant=TENANT, timeout=1, scheduled_at=at)
        elif i % 4 == 3:
            sig = sig.set(priority=1, timeout=1.5, retries=0)
        calls.append(sig)
    with Session(outbox.engine) as session, session.begin():
        held = [outbox.push(session, call) for call in calls]
    single = _pushed_by_insert(outbox, calls)
    assert _rows(outbox, held) == _rows(outbox, single)
    assert [outbox.get(i).scheduled_at == at for i in held] == [i % 4 == 2 for i in range(60)]
    assert {outbox.get(held[i]).tenant for i in range(2, 60, 4)} == {TENANT}


@pytest.mark.parametrize("count", [60, 6], ids=["copy", "insert"])
def test_a_router_function_routes_each_call_of_a_bulk_push(make_outbox: Callable[..., Outbox], count: int) -> None:
    """Proves push_many routes by Celery's ``task_routes`` as push does when the router is a function of the
    call's arguments: calls of one command with the same options (which share one validated template
    otherwise) each reach the queue the router picks for their own arguments, through COPY and through
    INSERT; a command with a target of its own is not routed."""
    outbox = make_outbox()
    regions = ["eu", "us", "ap"]
    prefix = unique_target("region")

    def by_region(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> Any:
        return {"queue": f"{prefix}-{args[0]}"} if args else None

    outbox.app.conf.task_routes = [by_region]
    outbox.app.amqp.flush_routes()

    @outbox.command(name=f"{prefix}.ship")
    def ship(region: str) -> None: ...

    pinned = unique_target("pinned")

    @outbox.command(name=f"{prefix}.pinned", target=pinned)
    def pinned_ship(region: str) -> None: ...

    calls = [ship.s(regions[i % 3]) for i in range(count)]
    with Session(outbox.engine) as session, session.begin():
        ids = outbox.push_many(session, [*calls, pinned_ship.s("eu"), pinned_ship.s("us")])
        single = ship.push(session, "ap")
    targets = [outbox.get(i).target for i in ids]
    assert targets[:count] == [f"{prefix}-{regions[i % 3]}" for i in range(count)]
    assert targets[count:] == [pinned, pinned]
    assert outbox.get(single).target == f"{prefix}-ap"


def test_batch_of_many_members_goes_through_copy_intact(echo: Any) -> None:
    """Proves the other COPY path (rows of any shape, here a batch's 70 members with a tenant) stores each
    member's tricky input and its batch and tenant."""
    outbox: Outbox = echo.outbox
    calls = [echo.s(TRICKY[i % len(TRICKY)], {"i": i}) for i in range(70)]
    with Session(outbox.engine) as session, session.begin():
        ref = outbox.push_batch(session, calls, tenant=TENANT)
    rows = [outbox.get(i) for i in ref.member_ids]
    assert [r.input["text"] for r in rows] == [TRICKY[i % len(TRICKY)] for i in range(70)]
    assert {r.tenant for r in rows} == {TENANT}
    assert outbox.batch(ref.id).total == 70


def test_a_bad_call_deep_in_a_streamed_copy_leaves_nothing_and_the_transaction_usable(echo: Any) -> None:
    """Guarantee 7 for a push large enough to be written while it is checked (5 000 calls, COPY in chunks):
    call 4 500 cannot be encoded (NaN). The push raises InvalidInput naming it; none of the 4 499 rows COPY
    had already sent stays; a command pushed before it in the same transaction, and the transaction itself,
    are untouched - the caller can go on and commit."""
    outbox = echo.outbox
    calls = [echo.s(f"row {i}", {"i": i}) for i in range(5_000)]
    calls[4_500] = echo.s("bad", {"x": float("nan")})
    with Session(outbox.engine) as session, session.begin():
        before = echo.push(session, "before", {})
        with pytest.raises(InvalidInput, match="payload"):
            outbox.push_many(session, calls)
        after = outbox.push_many(session, calls[:100])
    table = outbox.store.table
    with outbox.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 101
    assert outbox.get(before).status == "pending" and len(after) == 100


def test_a_streamed_copy_stores_every_row_in_push_order(echo: Any) -> None:
    """A push of 4 500 calls goes through COPY in several chunks: every row is stored with its own input, and
    the returned ids are the calls' commands, in push order."""
    outbox = echo.outbox
    ids = outbox.push_many(outbox.engine, [echo.s(f"row {i}", {"i": i}) for i in range(4_500)])
    assert len(ids) == len(set(ids)) == 4_500
    assert [outbox.get(ids[i]).input for i in (0, 2_000, 4_499)] == [
        {"text": f"row {i}", "payload": {"i": i}} for i in (0, 2_000, 4_499)
    ]
