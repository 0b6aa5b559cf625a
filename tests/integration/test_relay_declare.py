"""The relay declares a target's queue once per broker connection, and again on a new one (RabbitMQ)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox

from .support import unique_target
from conftest import AMQP_URL, make_app, require, unique_prefix
from support.broker import delete_queue, queue_depth

pytestmark = pytest.mark.pg


def test_a_new_broker_connection_declares_the_target_queue_again(pg_engine: sa.Engine) -> None:
    """Proves the relay's once-per-connection declaration loses nothing when it reconnects: the queue is
    declared at the first publish; after it vanished and the relay's connection was renewed (as after a
    broker error), the next publish declares it again and the message is in it, not dropped as unroutable."""
    require("127.0.0.1", 5672, "RabbitMQ")
    outbox = Outbox(make_app(AMQP_URL), pg_engine, table_prefix=unique_prefix())
    outbox.create_tables()
    target = unique_target("declare")

    @outbox.command(target=target)
    def noop() -> None: ...

    try:
        noop.push(pg_engine)
        noop.push(pg_engine)
        assert outbox.relay_once() == 2
        assert queue_depth(AMQP_URL, target, missing_ok=False) == 2  # declared once, both messages in
        delete_queue(AMQP_URL, target)
        outbox.relay.close()
        noop.push(pg_engine)
        assert outbox.relay_once() == 1
        assert queue_depth(AMQP_URL, target, missing_ok=False) == 1
    finally:
        delete_queue(AMQP_URL, target)
        outbox.store.drop_all()
        outbox.close()


@pytest.mark.parametrize(
    "conf",
    [
        {"task_send_sent_event": True},
        {"broker_transport_options": {"confirm_publish": True}},
        {"task_send_sent_event": True, "broker_transport_options": {"confirm_publish": True}},
    ],
    ids=["sent-event", "confirm-publish", "both"],
)
def test_celery_options_that_publish_on_the_relays_channel_keep_confirms_exact(
    pg_engine: sa.Engine, conf: dict[str, object]
) -> None:
    """Proves the relay counts publisher confirms right with Celery's own options on: with
    ``task_send_sent_event`` Celery publishes a ``task-sent`` event on the relay's confirm-mode channel for
    every command, and ``confirm_publish`` makes kombu wait per message. 60 commands are published in one
    relay run without a confirm timeout (it would take 10 s and return them to pending), none is
    republished (a second run publishes nothing), every row stays at attempt 1, and the queue holds 60."""
    require("127.0.0.1", 5672, "RabbitMQ")
    app = make_app(AMQP_URL)
    app.conf.update(conf)
    outbox = Outbox(app, pg_engine, table_prefix=unique_prefix())
    outbox.create_tables()
    target = unique_target("confirm")

    @outbox.command(target=target)
    def noop(n: int) -> None: ...

    try:
        outbox.push_many(pg_engine, [noop.s(i) for i in range(60)])
        assert outbox.relay_once() == 60
        assert outbox.relay_once() == 0
        rows = outbox.find(target=target, limit=100)
        assert {(r.status, r.attempt) for r in rows} == {("dispatched", 1)}
        assert queue_depth(AMQP_URL, target, missing_ok=False) == 60
    finally:
        delete_queue(AMQP_URL, target)
        outbox.store.drop_all()
        outbox.close()
