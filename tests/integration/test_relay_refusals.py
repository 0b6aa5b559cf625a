"""Messages RabbitMQ refuses (negative publisher confirms): their rows wait, and after a batch refused whole the
next one goes on a new connection and channel."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from kombu import Queue

from orch_outbox import Outbox

from .support import target_queue
from conftest import AMQP_URL, make_app, require

pytestmark = pytest.mark.pg


def test_a_batch_refused_whole_is_sent_again_on_a_new_channel(make_outbox: Callable[..., Outbox]) -> None:
    """Proves a batch the broker refuses whole loses nothing and is not sent again on the same channel: every row
    is pending again with no retry used, and the next batch goes on a new connection; the relay does not pause
    (other targets' commands would wait with them). A batch refused in part (some messages taken) returns only the
    refused rows and keeps its channel. Here the queue refuses by its length limit (``x-max-length`` 1,
    ``reject-publish``); after a node's loss a quorum queue's channel can refuse the same way."""
    require("127.0.0.1", 5672, "RabbitMQ")
    app = make_app(AMQP_URL)
    with target_queue(app, "refused") as target:  # the queue is deleted afterwards
        queue = Queue(target, queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        app.conf.task_queues = [queue]
        outbox = make_outbox(app=app)  # closed by the fixture, the relay's connection with it

        @outbox.command(target=target)
        def noop(n: int) -> None: ...

        relay = outbox.relay
        outbox.push_many(outbox.engine, [noop.s(0)])
        assert outbox.relay_once() == 1  # the queue now holds its one message: it refuses the next ones
        first = relay._producer.connection
        outbox.push_many(outbox.engine, [noop.s(n) for n in range(1, 4)])
        assert outbox.relay_once() == 0
        waiting = [r for r in outbox.find(target=target, limit=10) if r.input != {"n": 0}]
        assert len(waiting) == 3
        assert {(r.status, r.retries_left) for r in waiting} == {("pending", waiting[0].retries)}
        assert relay._producer is None  # the connection is closed: the next publish opens a new one
        assert relay.broker_retry_at == 0.0  # no pause

        with app.connection_for_write() as conn:
            queue(conn.default_channel).purge()
        assert outbox.relay_once() == 1  # one taken (the limit), two refused: a refusal in part
        assert relay._producer is not None  # kept
        assert relay._producer.connection is not first  # the new connection opened after the refusal whole
        assert outbox.store.count(status="pending") == 2
