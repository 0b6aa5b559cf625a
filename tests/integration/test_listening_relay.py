"""The listening relay: a commit that pushed commands is relayed at once, not at the next poll."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.orm import Session

from orch_outbox import Outbox
from orch_outbox.testing import wait_until

from conftest import unique_prefix

pytestmark = pytest.mark.pg


@pytest.fixture
def slow_poll_outbox(pg_engine: sa.Engine, celery_app: Celery) -> Outbox:
    # A poll interval far beyond the test's waits: only a NOTIFY can explain a prompt dispatch.
    outbox = Outbox(celery_app, pg_engine, table_prefix=unique_prefix(), poll_interval=120.0, rescue_interval=120.0)
    outbox.create_tables()
    yield outbox
    outbox.store.drop_all()


def test_commit_wakes_the_relay(slow_poll_outbox: Outbox) -> None:
    """Proves NOTIFY-on-commit: with a 120 s poll interval the command is dispatched within 10 s."""
    outbox = slow_poll_outbox
    published: list[str] = []
    outbox.relay._send = lambda _producer, item, retry=True: published.append(str(item.id))  # type: ignore[method-assign]

    @outbox.command(target="listen-q")
    def ping(n: int) -> int:
        return n

    relay = outbox.listening_relay()
    relay.start()
    try:
        wait_until(lambda: relay.passes >= 1, 10, what="the first relay pass")
        with Session(outbox.engine) as session, session.begin():
            command_id = ping.push(session, 1)
        wait_until(lambda: str(command_id) in published, 10, what="the notified relay to publish")
        assert outbox.get(command_id).status == "dispatched"
    finally:
        relay.close()


def test_rolled_back_push_notifies_nothing(slow_poll_outbox: Outbox) -> None:
    """Proves the notification is transactional: a rolled-back push wakes no relay pass."""
    outbox = slow_poll_outbox

    @outbox.command(target="listen-q")
    def ping(n: int) -> int:
        return n

    relay = outbox.listening_relay()
    relay.start()
    try:
        # The first pass, then the one right after the relay marked itself idle (a push committed
        # in between would not have notified it): from then on only a notification wakes it.
        wait_until(lambda: relay.passes >= 2, 10, what="the first relay passes")
        passes = relay.passes
        with Session(outbox.engine) as session, session.begin():
            ping.push(session, 1)
            session.rollback()
        with Session(outbox.engine) as session, session.begin():
            marker = ping.push(session, 2)
        wait_until(lambda: outbox.get(marker).status == "dispatched", 10, what="the committed push")
        wait_until(lambda: relay.passes > passes, 10, what="the pass that dispatched it to finish")
        # One commit, one wake-up: the rolled-back push added none (a wake-up from it
        # would have come, and been counted, before the pass of the later commit).
        assert relay.passes == passes + 1
    finally:
        relay.close()


def test_listener_reconnects_after_its_connection_is_killed(slow_poll_outbox: Outbox, pg_engine: sa.Engine) -> None:
    """Proves the listener survives a dropped connection (e.g. a database restart) and listens again."""
    outbox = slow_poll_outbox

    @outbox.command(target="listen-q")
    def ping(n: int) -> int:
        return n

    outbox.relay._send = lambda _producer, _item, retry=True: None  # type: ignore[method-assign]
    relay = outbox.listening_relay()
    relay.start()
    try:
        wait_until(relay.listening.is_set, 10, what="the listener")
        channel = f"{outbox.settings.table_prefix}commands"
        with pg_engine.begin() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query ILIKE :q AND pid <> pg_backend_pid()"
                ),
                {"q": f'%LISTEN "{channel}"%'},
            ).all()
        assert killed, "no listening backend was found to kill"
        wait_until(lambda: not relay.listening.is_set(), 10, what="the listener to notice")
        wait_until(relay.listening.is_set, 20, what="the listener to reconnect")
        wait_until(lambda: relay.passes >= 2, 10, what="a relay pass after reconnecting")
        with Session(outbox.engine) as session, session.begin():
            command_id = ping.push(session, 1)
        wait_until(lambda: outbox.get(command_id).status == "dispatched", 10, what="dispatch after reconnect")
    finally:
        relay.close()


def test_a_push_notifies_only_while_a_relay_is_idle(slow_poll_outbox: Outbox) -> None:
    """Proves the trigger's condition: with no relay marked idle (or one marked busy) a push sends no NOTIFY, so its
    commit takes no cluster-wide notify lock; with one marked idle it does, and an idle mark that ran out does not."""
    outbox = slow_poll_outbox

    @outbox.command(target="listen-q")
    def ping(n: int) -> int:
        return n

    def notified_by_a_push() -> bool:
        with outbox.store.listen() as wait:
            ping.push(outbox.engine, 1)
            return wait(0.5)

    assert not notified_by_a_push()  # nobody listens
    outbox.store.mark_idle("relay-a", 30)
    assert notified_by_a_push()
    outbox.store.mark_busy("relay-a")
    assert not notified_by_a_push()
    outbox.store.mark_idle("relay-a", -1)  # an idle mark from a relay that died long ago
    assert not notified_by_a_push()
    outbox.store.forget_listener("relay-a")


def test_never_notify_polls_with_jitter(pg_engine: sa.Engine, celery_app: Celery) -> None:
    """Proves `outbox_notify = "never"`: the relay does not LISTEN, marks nothing idle, and still relays a push
    within its poll interval."""
    outbox = Outbox(celery_app, pg_engine, table_prefix=unique_prefix(), poll_interval=0.3, notify="never")
    outbox.create_tables()
    published: list[str] = []
    outbox.relay._send = lambda _producer, item, retry=True: published.append(str(item.id))  # type: ignore[method-assign]

    @outbox.command(target="listen-q")
    def ping(n: int) -> int:
        return n

    relay = outbox.listening_relay()
    relay.start()
    try:
        wait_until(lambda: relay.passes >= 1, 10, what="the first relay pass")
        command_id = ping.push(outbox.engine, 1)
        wait_until(lambda: str(command_id) in published, 10, what="the polling relay to publish")
        with outbox.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(outbox.store.listeners)).scalar_one() == 0
    finally:
        relay.close()
        outbox.store.drop_all()
