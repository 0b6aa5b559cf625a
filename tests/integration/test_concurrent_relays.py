"""Guarantee 5 on PostgreSQL: many relays at once, each due command claimed by exactly one.

The claim is ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)``; these
tests run several claimers on separate connections at the same time and count.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox
from orch_outbox.store import Dispatch
from orch_outbox.testing import wait_until

from .support import unique_target

pytestmark = pytest.mark.pg

JOIN_TIMEOUT = 60.0


def run_threads(count: int, body: Callable[[int], Any]) -> list[Any]:
    """Run ``body(i)`` in ``count`` threads released together; re-raise the first error."""
    barrier = threading.Barrier(count, timeout=JOIN_TIMEOUT)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait()
            results[i] = body(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a claimer thread did not finish"
    if errors:
        raise errors[0]
    return results


def status_attempts(outbox: Outbox) -> Counter[tuple[str, int]]:
    t = outbox.store.table
    with outbox.engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.status, t.c.attempt, sa.func.count()).group_by(t.c.status, t.c.attempt))
        return Counter({(r[0], r[1]): int(r[2]) for r in rows})


def define_noop(outbox: Outbox) -> Any:
    @outbox.command(target=unique_target("work"))
    def noop(n: int) -> None:
        raise AssertionError("not executed: these tests stop at the relay")

    return noop


def test_four_concurrent_claimers_claim_each_due_command_exactly_once(pg_outbox: Outbox, pg_engine: sa.Engine) -> None:
    """Guarantee 5: 4 threads loop ``store.claim`` over 3000 due commands; each is claimed by one.

    Fails if the claim's row locking let two claimers take the same row (an id would
    appear twice, or an attempt would be 2), or if SKIP LOCKED made a claimer give up
    while unclaimed rows were left (total < 3000 or rows still pending).
    """
    noop = define_noop(pg_outbox)
    total = 3000
    with pg_engine.begin() as conn:
        ids = pg_outbox.push_many(conn, [noop.s(i) for i in range(total)])
    store = pg_outbox.store

    def claimer(_i: int) -> list[Dispatch]:
        mine: list[Dispatch] = []
        while batch := store.claim(50, 60):
            mine.extend(batch)
        return mine

    per_thread = run_threads(4, claimer)

    claimed = [d.id for batch in per_thread for d in batch]
    counts = Counter(claimed)
    assert [i for i, n in counts.items() if n > 1] == []
    assert len(claimed) == total
    assert set(claimed) == set(ids)
    assert all(d.attempt == 1 for batch in per_thread for d in batch)
    assert status_attempts(pg_outbox) == Counter({("dispatched", 1): total})
    assert store.claim(50, 60) == []


def test_concurrent_relay_runs_publish_each_attempt_exactly_once(
    pg_outbox: Outbox, pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guarantee 5 through ``Relay``: two ``relay_once`` loops at once publish each (id, attempt) once.

    Publishing is replaced by a recording fake. Fails if two relays published the same
    claimed row (a duplicate message for one attempt) or left a due row unpublished.
    """
    noop = define_noop(pg_outbox)
    total = 1500
    # No in-flight cap here: every row must be claimable (the cap has its own test below).
    monkeypatch.setitem(pg_outbox.__dict__, "settings", dataclasses.replace(pg_outbox.settings, max_in_flight=0))
    with pg_engine.begin() as conn:
        ids = pg_outbox.push_many(conn, [noop.s(i) for i in range(total)])

    published: list[tuple[uuid.UUID, int]] = []
    lock = threading.Lock()

    def fake_send(_producer: object, item: Dispatch, retry: bool = True) -> None:
        with lock:
            published.append((item.id, item.attempt))

    relay = pg_outbox.relay  # build the cached relay, store and settings before the threads race
    monkeypatch.setattr(relay, "_send", fake_send)
    monkeypatch.setattr(relay, "settings", dataclasses.replace(relay.settings, batch_size=40))

    def relay_loop(_i: int) -> int:
        sent = 0
        while n := pg_outbox.relay_once():
            sent += n
        return sent

    sent_per_relay = run_threads(2, relay_loop)

    assert sum(sent_per_relay) == total
    counts = Counter(published)
    assert [k for k, n in counts.items() if n > 1] == []
    assert {i for i, _ in published} == set(ids)
    assert {a for _, a in published} == {1}
    assert status_attempts(pg_outbox) == Counter({("dispatched", 1): total})


def test_relay_broker_failure_mid_batch_returns_only_unsent_rows(
    pg_outbox: Outbox, pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guarantee 5 / relay crash safety: a publish failing mid-batch undispatches only the unsent rows.

    Fails if rows already published were put back to pending (they would be published
    twice) or if the unsent ones stayed dispatched (they would wait for the lease).
    """
    from kombu.exceptions import OperationalError

    noop = define_noop(pg_outbox)
    with pg_engine.begin() as conn:
        ids = pg_outbox.push_many(conn, [noop.s(i) for i in range(10)])

    published: list[tuple[uuid.UUID, int]] = []
    broken = threading.Event()
    broken.set()

    def flaky_send(_producer: object, item: Dispatch, retry: bool = True) -> None:
        if broken.is_set() and len(published) == 4:
            raise OperationalError("broker down")
        published.append((item.id, item.attempt))

    monkeypatch.setattr(pg_outbox.relay, "_send", flaky_send)
    assert pg_outbox.relay_once() == 4
    first = {i for i, _ in published}
    statuses = Counter(pg_outbox.get(i).status for i in ids)
    assert statuses == Counter({"dispatched": 4, "pending": 6})
    assert all(pg_outbox.get(i).status == "dispatched" for i in first)

    broken.clear()
    # The relay backs off after a broker failure: the next run claims nothing (the rows
    # wait in the database), and a run after the pause publishes the rest.
    assert pg_outbox.relay_once() == 0
    assert pg_outbox.relay.broker_retry_at > 0
    sent = wait_until(lambda: pg_outbox.relay_once() or None, timeout=5.0, what="relay after broker backoff")
    assert sent == 6
    assert Counter(i for i, _ in published) == Counter(dict.fromkeys(ids, 1))
    assert all(pg_outbox.get(i).status == "dispatched" for i in ids)


def test_max_in_flight_keeps_the_backlog_in_the_database(make_outbox: Any) -> None:
    """Proves outbox_max_in_flight: per target, at most that many messages are published and not yet
    started; the rest stays pending (reorderable, cancelable), other targets are not held back, and a
    started command frees a place."""
    outbox = make_outbox(max_in_flight=3, batch_size=50)

    @outbox.command(target="busy-q")
    def busy(n: int) -> None: ...

    @outbox.command(target="quiet-q")
    def quiet(n: int) -> None: ...

    with outbox.engine.begin() as conn:
        outbox.push_many(conn, [busy.s(i) for i in range(10)] + [quiet.s(i) for i in range(2)])
    first = outbox.store.claim(50, 60, 3)
    assert Counter(d.target for d in first) == Counter({"busy-q": 3, "quiet-q": 2})
    assert outbox.store.claim(50, 60, 3) == []  # busy-q is full, quiet-q has nothing left
    started = next(d for d in first if d.target == "busy-q")
    assert outbox.store.start(started.id, started.attempt, "busy", "w1", 30) is not None
    [freed] = outbox.store.claim(50, 60, 3)
    assert freed.target == "busy-q"
    assert Counter(outbox.get(i).status for i in _ids(outbox)) == Counter({"pending": 6, "dispatched": 5, "running": 1})
    assert len(outbox.store.claim(50, 60, 0)) == 6  # 0: no limit


def _ids(outbox: Any) -> list[Any]:
    with outbox.engine.connect() as conn:
        return list(conn.execute(sa.select(outbox.store.table.c.id)).scalars())
