"""One suite of store cases, run on each of the store's three paths to the database (as River's driver tests).

``hot``: PostgreSQL, database clock, psycopg: claim, start, complete and complete_many run as prepared
statements on psycopg directly. ``core``: the same store with the hot path switched off, so every statement
goes through SQLAlchemy Core. ``sqlite``: a SQLite file, Python clock. The cases and their assertions are
the same on every path: a difference between paths is a defect of the store, not of a case.
Deterministic: nothing waits; "later" is a delay of an hour, "now" a delay of zero or less.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox.store import Dispatch, ErrorInfo, Started, Store, make_engine
from orch_outbox.uuid7 import uuid7

from conftest import unique_prefix

HOUR = 3600.0
ERROR = ErrorInfo("ValueError", "boom", "Traceback: boom")


@pytest.fixture(
    params=[
        pytest.param("hot", marks=pytest.mark.pg),
        pytest.param("core", marks=pytest.mark.pg),
        "sqlite",
    ]
)
def driver(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    """A store with fresh tables on one path: ``hot``, ``core`` (PostgreSQL) or ``sqlite``."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path}/x.sqlite3")
        store = Store(engine, unique_prefix())
        assert store._hot is None
        store.create_all()
        yield store
        store.close()
        engine.dispose()
        return
    store = Store(request.getfixturevalue("pg_engine"), unique_prefix())
    if request.param == "core":
        store._hot = None
        assert store._hot is None
    else:
        assert store._hot is not None
    store.create_all()
    yield store
    store.close()
    store.drop_all()


def make_row(name: str = "job", target: str = "q", priority: int = 0, retries: int = 2, **extra: Any) -> dict[str, Any]:
    """A command row with the keys ``Outbox.row_for`` gives it (override any, or add ``expires``, in ``extra``)."""
    return {
        "id": uuid7(),
        "name": name,
        "target": target,
        "input": {"n": 1, "text": "é"},
        "retries": retries,
        "retries_left": retries,
        "timeout": 30.0,
        "priority": priority,
        "parent_id": None,
        "delay": 0.0,
        "scheduled_at": None,
        "expires_at": None,
        "unique_key": None,
        "tenant": None,
        **extra,
    }


def push(store: Store, *rows: dict[str, Any]) -> list[uuid.UUID]:
    with store.engine.begin() as conn:
        return store.insert(conn, list(rows))


def read(store: Store, command_id: uuid.UUID) -> dict[str, Any]:
    found = store.get(command_id)
    assert found is not None
    return dict(found)


def running(store: Store, *rows: dict[str, Any], lease: float = HOUR) -> list[int]:
    """Push ``rows``, claim and start them (worker ``w``); their attempts, in the order given."""
    ids = push(store, *rows)
    attempts = {d.id: d.attempt for d in store.claim(100, HOUR)}
    assert set(attempts) == set(ids)
    for row in rows:
        assert store.start(row["id"], attempts[row["id"]], row["name"], "w", lease) is not None
    return [attempts[i] for i in ids]


def near(when: dt.datetime | None, seconds: float, slack: float = 60.0) -> bool:
    """``when`` is about ``seconds`` from now (the database clock and the test's may differ a little)."""
    assert when is not None
    expected = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return abs((when - expected).total_seconds()) < slack


def set_expiry(store: Store, command_id: uuid.UUID, when: dt.datetime) -> None:
    t = store.table
    with store.engine.begin() as conn:
        conn.execute(sa.update(t).where(t.c.id == command_id).values(expires_at=when))


def test_push_then_claim(driver: Store) -> None:
    """Proves the claim takes due pending rows by priority, then oldest first, up to its limit: each becomes
    dispatched under attempt 1 with a dispatch lease, and the Dispatch carries the row's fields (expires_at,
    retries, retries_left); a claimed row is not claimed again and a row due later is not claimed at all."""
    expires_at = dt.datetime.now(dt.UTC).replace(microsecond=123456) + dt.timedelta(days=1)
    old = make_row(delay=-30.0, retries=3, expires_at=expires_at)
    high = make_row(priority=5, delay=-10.0, name="urgent", target="fast")
    new = make_row(delay=-20.0)
    newest = make_row(delay=-5.0)
    later = make_row(delay=HOUR)
    push(driver, old, high, new, newest, later)

    first = driver.claim(3, 120.0)
    assert [d.id for d in first] == [high["id"], old["id"], new["id"]]
    assert first[1] == Dispatch(old["id"], "job", "q", 1, old["input"], 30.0, 0, expires_at, 3, 3)
    assert first[0] == Dispatch(high["id"], "urgent", "fast", 1, high["input"], 30.0, 5, None, 2, 2)
    for d in first:
        claimed = read(driver, d.id)
        assert (claimed["status"], claimed["attempt"]) == ("dispatched", 1)
        assert near(claimed["lease_expires_at"], 120.0) and claimed["dispatched_at"] is not None

    assert [d.id for d in driver.claim(10, 120.0)] == [newest["id"]]
    assert driver.claim(10, 120.0) == []
    waiting = read(driver, later["id"])
    assert (waiting["status"], waiting["attempt"]) == ("pending", 0)


def test_insert_rows_of_different_shapes(driver: Store) -> None:
    """Proves one insert takes rows whose keys differ: here rows shaped as ``canvas.row_from_step`` makes them
    (no ``expires_at`` key, ``expires`` given or None), as the members of a group step chained after a command
    are, with one member given ``expires=``; both rows are stored, with and without an expiry. (Regression:
    SQLite wrote them in one executemany with the first row's keys and failed.)"""
    expiring, plain = make_row(expires=HOUR), make_row(expires=None)
    del expiring["expires_at"], plain["expires_at"]
    assert push(driver, expiring, plain) == [expiring["id"], plain["id"]]
    assert near(read(driver, expiring["id"])["expires_at"], HOUR)
    assert read(driver, plain["id"])["expires_at"] is None


def test_max_in_flight_caps_each_target(driver: Store) -> None:
    """Proves ``max_in_flight`` caps, per target, the messages dispatched and not yet started: a full target
    is skipped while others are claimed, and a start frees a place."""
    a = [make_row(target="a", delay=-10.0 + i) for i in range(4)]
    b = [make_row(target="b", delay=-10.0 + i) for i in range(3)]
    push(driver, *a, *b)
    first = driver.claim(100, HOUR, max_in_flight=2)
    assert {d.id for d in first} == {a[0]["id"], a[1]["id"], b[0]["id"], b[1]["id"]}
    assert driver.claim(100, HOUR, max_in_flight=2) == []
    assert driver.start(a[0]["id"], 1, "job", "w", HOUR) is not None
    assert [d.id for d in driver.claim(100, HOUR, max_in_flight=2)] == [a[2]["id"]]
    assert [d.id for d in driver.claim(100, HOUR)] == [a[3]["id"], b[2]["id"]]


def test_start_is_fenced_by_attempt_and_name(driver: Store) -> None:
    """Proves start moves only the dispatched attempt of the right name to running, once: a wrong attempt, a
    wrong name and a second start each get None; the one start returns Started with the row's fields."""
    row = make_row(tenant="acme", chain=[{"task": "next", "args": [1]}])
    push(driver, row)
    [claimed] = driver.claim(10, HOUR)
    assert driver.start(row["id"], claimed.attempt + 1, "job", "w1", 60.0) is None
    assert driver.start(row["id"], claimed.attempt, "other", "w1", 60.0) is None
    started = driver.start(row["id"], claimed.attempt, "job", "w1", 60.0)
    stored = read(driver, row["id"])
    assert started == Started(
        row["id"],
        "job",
        "q",
        1,
        row["input"],
        30.0,
        2,
        2,
        tenant="acme",
        batch_id=None,
        chain=row["chain"],
        scheduled_at=stored["scheduled_at"],
    )
    assert driver.start(row["id"], claimed.attempt, "job", "w2", 60.0) is None
    assert (stored["status"], stored["worker"], stored["attempt"]) == ("running", "w1", 1)
    assert near(stored["lease_expires_at"], 60.0) and stored["started_at"] is not None


def test_complete_is_fenced_and_inserts_children(driver: Store) -> None:
    """Proves complete records the output only for the attempt holding the row (a wrong attempt changes
    nothing and inserts no child), and inserts the on-success commands with the outcome, with their parent_id."""
    plain, parent = make_row(), make_row()
    attempt_plain, attempt_parent = running(driver, plain, parent)
    child = make_row(name="child", parent_id=parent["id"])

    assert not driver.complete(plain["id"], attempt_plain + 1, {"wrong": True}, [])
    assert not driver.complete(parent["id"], attempt_parent + 1, None, [make_row(parent_id=parent["id"])])
    assert driver.children(parent["id"]) == []
    assert read(driver, plain["id"])["status"] == "running"

    output = {"sum": 3, "items": [1, "two"]}
    assert driver.complete(plain["id"], attempt_plain, output, [])
    assert driver.complete(parent["id"], attempt_parent, 7, [child])
    assert not driver.complete(plain["id"], attempt_plain, "again", [])
    done = read(driver, plain["id"])
    assert (done["status"], done["outcome"], done["output"]) == ("completed", "success", output)
    assert done["lease_expires_at"] is None and done["finished_at"] is not None
    assert (read(driver, parent["id"])["status"], read(driver, parent["id"])["output"]) == ("completed", 7)
    [stored_child] = driver.children(parent["id"])
    assert (stored_child["id"], stored_child["name"], stored_child["status"]) == (child["id"], "child", "pending")
    assert stored_child["parent_id"] == parent["id"]


def test_complete_many_records_only_the_held_attempts(driver: Store) -> None:
    """Proves complete_many records several successes in one call, each fenced as complete: the returned set
    is exactly the ids recorded, a wrong attempt is left running, each row gets its own output."""
    rows = [make_row() for _ in range(4)]
    attempts = running(driver, *rows)
    outputs = [None, "text é", {"i": "wrong"}, [1, 2.5, True, {"i": 3}]]
    items = [(row["id"], attempt, out) for row, attempt, out in zip(rows, attempts, outputs, strict=True)]
    items[2] = (rows[2]["id"], attempts[2] + 1, outputs[2])
    assert driver.complete_many(items) == {rows[0]["id"], rows[1]["id"], rows[3]["id"]}
    for i in (0, 1, 3):
        done = read(driver, rows[i]["id"])
        assert (done["status"], done["outcome"], done["output"]) == ("completed", "success", outputs[i])
    fenced = read(driver, rows[2]["id"])
    assert (fenced["status"], fenced["output"]) == ("running", None)
    assert driver.complete_many([(rows[0]["id"], attempts[0], {"i": "again"})]) == set()
    assert driver.complete_many([]) == set()


def test_fail_with_children_and_retry(driver: Store) -> None:
    """Proves fail records the error and inserts its on-failure commands in the same fenced step; retry puts
    the attempt back to pending with one retry fewer, due after its delay (not claimable before); retry is
    refused when no retry is left."""
    failing, retried, spent = make_row(), make_row(retries=2), make_row(retries=0)
    attempt_f, attempt_r, attempt_s = running(driver, failing, retried, spent)
    alarm = make_row(name="alarm", parent_id=failing["id"])

    assert not driver.fail(failing["id"], attempt_f + 1, "failure", ERROR, [make_row(parent_id=failing["id"])])
    assert driver.fail(failing["id"], attempt_f, "failure", ERROR, [alarm])
    failed = read(driver, failing["id"])
    assert (failed["status"], failed["outcome"], failed["error_type"]) == ("failed", "failure", "ValueError")
    assert (failed["error_message"], failed["error_traceback"]) == ("boom", "Traceback: boom")
    assert [c["id"] for c in driver.children(failing["id"])] == [alarm["id"]]
    assert not driver.fail(failing["id"], attempt_f, "failure", ERROR, [])

    assert not driver.retry(retried["id"], attempt_r + 1, "failure", ERROR, HOUR)
    assert driver.retry(retried["id"], attempt_r, "failure", ERROR, HOUR)
    again = read(driver, retried["id"])
    assert (again["status"], again["retries_left"], again["outcome"], again["attempt"]) == ("pending", 1, "failure", 1)
    assert again["lease_expires_at"] is None and near(again["scheduled_at"], HOUR)
    assert [d.id for d in driver.claim(10, HOUR)] == [alarm["id"]]  # the retried row is not due yet

    assert not driver.retry(spent["id"], attempt_s, "failure", ERROR, 0.0)
    assert (read(driver, spent["id"])["status"], read(driver, spent["id"])["retries_left"]) == ("running", 0)


def test_heartbeat(driver: Store) -> None:
    """Proves heartbeat answers (held, cancel requested): (True, False) for the holding attempt, (True, True)
    once its cancellation is requested, (False, False) for a wrong attempt; it sets the lease to now + lease."""
    row = make_row()
    [attempt] = running(driver, row, lease=5.0)
    assert driver.heartbeat(row["id"], attempt, HOUR) == (True, False)
    assert near(read(driver, row["id"])["lease_expires_at"], HOUR)
    assert driver.cancel(row["id"], lambda name, data: []) == ("running", attempt)
    assert driver.heartbeat(row["id"], attempt, HOUR) == (True, True)
    assert driver.heartbeat(row["id"], attempt + 1, HOUR) == (False, False)


def test_renew(driver: Store) -> None:
    """Proves renew answers only for attempts still holding their rows, with their cancel flag (a wrong
    attempt is absent), and moves a lease later, never earlier."""
    a, b = make_row(), make_row()
    attempt_a, attempt_b = running(driver, a, b, lease=60.0)
    assert driver.cancel(b["id"], lambda name, data: []) == ("running", attempt_b)
    renewed = driver.renew([(a["id"], attempt_a), (b["id"], attempt_b), (a["id"], attempt_a + 1)], HOUR)
    assert renewed == {(a["id"], attempt_a): False, (b["id"], attempt_b): True}
    lease = read(driver, a["id"])["lease_expires_at"]
    assert near(lease, HOUR)
    assert driver.renew([(a["id"], attempt_a)], 10.0) == {(a["id"], attempt_a): False}
    assert read(driver, a["id"])["lease_expires_at"] == lease  # never earlier
    driver.renew([(a["id"], attempt_a)], 2 * HOUR)
    assert near(read(driver, a["id"])["lease_expires_at"], 2 * HOUR)
    assert driver.renew([], HOUR) == {}


def test_cancel(driver: Store) -> None:
    """Proves cancel ends a pending (or dispatched) command at once with its on-cancel commands, only
    requests the cancellation of a running one (which ``canceled`` then records, fenced), and leaves a final
    command alone (None)."""
    pending, dispatched, run = make_row(delay=HOUR), make_row(), make_row()
    push(driver, pending, dispatched)
    [claimed] = driver.claim(10, HOUR)
    [attempt] = running(driver, run)
    asked: list[tuple[str, Any]] = []

    def on_cancel(name: str, data: Any) -> list[dict[str, Any]]:
        asked.append((name, data))
        return [make_row(name="undo", parent_id=pending["id"])] if len(asked) == 1 else []

    assert driver.cancel(pending["id"], on_cancel) == ("pending", 0)
    assert asked == [("job", pending["input"])]
    gone = read(driver, pending["id"])
    assert (gone["status"], gone["outcome"]) == ("canceled", "canceled") and gone["finished_at"] is not None
    assert [c["name"] for c in driver.children(pending["id"])] == ["undo"]
    assert driver.cancel(dispatched["id"], on_cancel) == ("dispatched", claimed.attempt)
    assert read(driver, dispatched["id"])["status"] == "canceled"
    assert driver.start(dispatched["id"], claimed.attempt, "job", "w", HOUR) is None

    assert driver.cancel(run["id"], on_cancel) == ("running", attempt)
    assert len(asked) == 2  # a running command's on-cancel commands come with the worker's ``canceled``
    requested = read(driver, run["id"])
    assert requested["status"] == "running" and requested["cancel_requested_at"] is not None
    assert not driver.canceled(run["id"], attempt + 1, [])
    assert driver.canceled(run["id"], attempt, [make_row(name="undo", parent_id=run["id"])])
    assert (read(driver, run["id"])["status"], read(driver, run["id"])["outcome"]) == ("canceled", "canceled")
    assert [c["name"] for c in driver.children(run["id"])] == ["undo"]
    assert driver.cancel(run["id"], on_cancel) is None
    assert driver.cancel(uuid7(), on_cancel) is None


def test_expire(driver: Store) -> None:
    """Proves a dispatched attempt past its expiry is refused by start and becomes expired by expire, one not
    yet past it is not expired; a pending row past its expiry is expired by the claim instead of dispatched."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    stale, fresh = make_row(expires=HOUR), make_row(expires=HOUR)
    push(driver, stale, fresh)
    attempts = {d.id: d.attempt for d in driver.claim(10, HOUR)}
    set_expiry(driver, stale["id"], past)

    assert driver.start(stale["id"], attempts[stale["id"]], "job", "w", HOUR) is None
    assert not driver.expire(stale["id"], attempts[stale["id"]] + 1)
    assert driver.expire(stale["id"], attempts[stale["id"]])
    expired = read(driver, stale["id"])
    assert (expired["status"], expired["outcome"], expired["lease_expires_at"]) == ("expired", "expired", None)
    assert driver.start(stale["id"], attempts[stale["id"]], "job", "w", HOUR) is None
    assert not driver.expire(stale["id"], attempts[stale["id"]])

    assert not driver.expire(fresh["id"], attempts[fresh["id"]])
    assert read(driver, fresh["id"])["status"] == "dispatched"
    assert driver.start(fresh["id"], attempts[fresh["id"]], "job", "w", HOUR) is not None

    late = make_row(expires_at=past)
    push(driver, late)
    seen: list[list[uuid.UUID]] = []
    assert driver.claim(10, HOUR, on_expired=seen.append) == []
    assert seen == [[late["id"]]]
    assert (read(driver, late["id"])["status"], read(driver, late["id"])["attempt"]) == ("expired", 0)


def test_hold_back_under_a_pause(driver: Store) -> None:
    """Proves a dispatched attempt of a paused target is not started and is held back to pending (same
    attempt, no retry used), only while the pause holds; the claim skips paused rows until resume."""
    row, other = make_row(target="held"), make_row(target="free")
    push(driver, row)
    [claimed] = driver.claim(10, HOUR)
    assert not driver.hold_back(row["id"], claimed.attempt)  # not paused
    assert driver.pause("target", "held") and not driver.pause("target", "held")
    assert driver.start(row["id"], claimed.attempt, "job", "w", HOUR) is None
    assert not driver.hold_back(row["id"], claimed.attempt + 1)
    assert driver.hold_back(row["id"], claimed.attempt)
    back = read(driver, row["id"])
    assert (back["status"], back["attempt"], back["retries_left"]) == ("pending", 1, 2)
    assert back["lease_expires_at"] is None
    push(driver, other)
    assert [d.id for d in driver.claim(10, HOUR)] == [other["id"]]
    assert driver.resume("target", "held") and not driver.resume("target", "held")
    [again] = driver.claim(10, HOUR)
    assert (again.id, again.attempt) == (row["id"], 2)


def test_undispatch(driver: Store) -> None:
    """Proves undispatch returns dispatched attempts to pending (no retry used, claimable again), counting
    only the ones it moved: a wrong attempt is left dispatched."""
    a, b = make_row(), make_row()
    push(driver, a, b)
    da, db = driver.claim(10, HOUR)
    assert driver.undispatch([da, dataclasses.replace(db, attempt=db.attempt + 1)]) == 1
    back = read(driver, a["id"])
    assert (back["status"], back["attempt"], back["retries_left"], back["lease_expires_at"]) == ("pending", 1, 2, None)
    assert read(driver, b["id"])["status"] == "dispatched"
    assert driver.undispatch([]) == 0
    [again] = driver.claim(10, HOUR)
    assert (again.id, again.attempt) == (a["id"], 2)
