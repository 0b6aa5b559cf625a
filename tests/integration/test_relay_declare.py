"""The relay declares a target's queue once per broker connection, and again on a new one (RabbitMQ)."""

from __future__ import annotations

import contextlib

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox

from .support import unique_target
from conftest import AMQP_URL, make_app, require, unique_prefix

pytestmark = pytest.mark.pg


def _depth(outbox: Outbox, queue: str) -> int:
    """Messages ready in ``queue``; raises if the queue does not exist (a passive declare)."""
    with outbox.app.connection_for_write() as conn:
        _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
    return int(count)


def _delete(outbox: Outbox, queue: str) -> None:
    with outbox.app.connection_for_write() as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_delete(queue=queue)


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
        assert _depth(outbox, target) == 2  # declared once, both messages in
        _delete(outbox, target)
        outbox.relay.close()
        noop.push(pg_engine)
        assert outbox.relay_once() == 1
        assert _depth(outbox, target) == 1
    finally:
        _delete(outbox, target)
        outbox.store.drop_all()
        outbox.close()
