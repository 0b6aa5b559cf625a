"""Messages RabbitMQ refuses (negative publisher confirms): their rows wait, and a broker that refuses a whole batch
is given a pause and a new channel instead of the same rows twice a second."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
from kombu import Queue

from orch_outbox import Outbox

from .support import unique_target
from conftest import AMQP_URL, make_app, require

pytestmark = pytest.mark.pg


def test_a_batch_refused_whole_pauses_the_relay_and_reopens_its_channel(make_outbox: Callable[..., Outbox]) -> None:
    """Proves a batch the broker refuses whole loses nothing and is not sent again at once on the same channel:
    every row is pending again with no retry used, the relay pauses as after a broker failure (a run during the
    pause claims nothing) and publishes again on a new connection. A batch refused in part (some messages taken)
    keeps its channel and does not pause. Here the queue refuses by its length limit (``x-max-length`` 1,
    ``reject-publish``); after a node's loss a quorum queue's channel can refuse the same way."""
    require("127.0.0.1", 5672, "RabbitMQ")
    app = make_app(AMQP_URL)
    target = unique_target("refused")
    queue = Queue(target, queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    app.conf.task_queues = [queue]
    outbox = make_outbox(app=app)

    @outbox.command(target=target)
    def noop(n: int) -> None: ...

    relay = outbox.relay
    try:
        outbox.push_many(outbox.engine, [noop.s(0)])
        assert outbox.relay_once() == 1  # the queue now holds its one message: it refuses the next ones
        first = relay._producer.connection
        outbox.push_many(outbox.engine, [noop.s(n) for n in range(1, 4)])
        before = time.monotonic()
        assert outbox.relay_once() == 0
        waiting = [r for r in outbox.find(target=target, limit=10) if r.input != {"n": 0}]
        assert len(waiting) == 3
        assert {(r.status, r.retries_left) for r in waiting} == {("pending", waiting[0].retries)}
        assert relay._producer is None  # the connection is closed: the next publish opens a new one
        assert relay.broker_retry_at >= before + 0.5
        assert outbox.relay_once() == 0  # paused: nothing claimed
        assert outbox.store.count(status="pending") == 3

        with app.connection_for_write() as conn:
            queue(conn.default_channel).purge()
        relay.broker_retry_at = 0.0  # past the pause
        pause_until = relay.broker_retry_at
        assert outbox.relay_once() == 1  # one taken (the limit), two refused: a refusal in part
        assert relay._producer is not None and relay._producer.connection is not first
        assert relay.broker_retry_at == pause_until  # no pause after a refusal in part
        assert outbox.store.count(status="pending") == 2
    finally:
        relay.close()
        with app.connection_for_write() as conn, contextlib.suppress(Exception):
            conn.default_channel.queue_delete(queue=target)
