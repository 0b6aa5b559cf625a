"""The relay's batch goes to RabbitMQ in as few socket writes as possible (``amqpwire.coalesced_writes``).

Every message still arrives, in order; a request that waits for the broker's answer (a
queue declared on the way) is sent before the wait, so nothing hangs; a batch that fails
half-way sends none of what it held; other transports are left as they are.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from orch_outbox.amqpwire import coalesced_writes
from orch_outbox.messages import Messages
from orch_outbox.relay import PUBLISH_RETRY_POLICY
from orch_outbox.store import Dispatch

from .support import target_queue
from conftest import AMQP_URL, REDIS_URL, make_app, require


def _app(url: str, port: int, what: str) -> Celery:
    require("127.0.0.1", port, what)
    app = make_app(url)

    @app.task(name="cw_plain", shared=False)
    def plain(**kwargs: Any) -> None: ...

    return app


@pytest.fixture
def rabbit() -> Celery:
    return _app(AMQP_URL, 5672, "RabbitMQ")


@pytest.fixture
def target(rabbit: Celery) -> Iterator[str]:
    with target_queue(rabbit, "cw") as name:
        yield name


def _relay_connection(app: Celery) -> Any:
    """A broker connection as the relay opens its own: kombu does not wait for a confirm after each message (the
    relay awaits a batch's confirms at once)."""
    return app.connection_for_write(transport_options={"confirm_publish": False})


def _row(target: str, n: int) -> Dispatch:
    return Dispatch(uuid.uuid4(), "cw_plain", target, 1, {"n": n}, 60.0, 0, None, 0, 0, None)


def _publish(app: Celery, producer: Any, row: Dispatch, declare: bool) -> None:
    Messages(app, PUBLISH_RETRY_POLICY).publish(producer, row, row.input, "", {}, {}, declare=declare, retry=False)


def _drain(app: Celery, target: str, most: int) -> list[int]:
    """The ``n`` of every message in ``target``, in queue order (at most ``most`` gets: bounded)."""
    got = []
    with app.connection_for_write() as conn:
        queue = app.amqp.queues[target].bind(conn.default_channel)
        for _ in range(most):
            message = queue.get(no_ack=True)
            if message is None:
                break
            got.append(message.decode()[1]["n"])
    return got


def _count_writes(conn: Any) -> list[int]:
    """Wrap the AMQP transport's socket write: the returned list gets the size of each write."""
    transport = conn.connection.transport
    send = transport._write
    sizes: list[int] = []

    def counted(data: Any) -> None:
        sizes.append(len(data))
        send(data)

    transport._write = counted
    return sizes


def test_a_batch_goes_out_in_one_write_after_its_queue_is_declared(rabbit: Celery, target: str) -> None:
    """Proves twenty messages reach RabbitMQ, in order, in one socket write, and that the queue declared by the
    first of them (requests the broker answers) is sent before the relay waits for each answer: the declare goes
    in writes of its own, so the block neither hangs nor loses a message."""
    with _relay_connection(rabbit) as conn:
        conn.ensure_connection(max_retries=1)
        producer = rabbit.amqp.Producer(conn)
        sizes = _count_writes(conn)
        with coalesced_writes(conn):
            for n in range(20):
                _publish(rabbit, producer, _row(target, n), declare=n == 0)
        # The declare's requests (channel, exchange, queue, binding: each sent before its answer is read), then
        # one write carrying the twenty messages; one write per message would be twenty-four writes or more.
        assert len(sizes) <= 5 and sizes[-1] > 10 * max(sizes[:-1]), sizes
    assert _drain(rabbit, target, 40) == list(range(20))


def test_a_batch_that_fails_half_way_sends_nothing_it_held(rabbit: Celery, target: str) -> None:
    """Proves a failure inside the block drops the messages it held (the relay returns their rows to pending,
    so none may reach the queue), and that the connection writes normally again afterwards."""
    with _relay_connection(rabbit) as conn:
        conn.ensure_connection(max_retries=1)
        producer = rabbit.amqp.Producer(conn)
        _publish(rabbit, producer, _row(target, 0), declare=True)  # the queue exists: nothing in the block reads
        with pytest.raises(RuntimeError, match="half-way"), coalesced_writes(conn):
            for n in (1, 2, 3):
                _publish(rabbit, producer, _row(target, n), declare=False)
            raise RuntimeError("half-way")
        _publish(rabbit, producer, _row(target, 4), declare=False)
    assert _drain(rabbit, target, 10) == [0, 4]


def test_other_transports_are_left_as_they_are() -> None:
    """Proves the block changes nothing on Redis: the messages published inside it arrive, in order."""
    app = _app(REDIS_URL, 6379, "Redis")
    with target_queue(app, "cw") as target:
        with _relay_connection(app) as conn:
            producer = app.amqp.Producer(conn)
            with coalesced_writes(conn):
                for n in range(3):
                    _publish(app, producer, _row(target, n), declare=n == 0)
        assert _drain(app, target, 10) == [0, 1, 2]


def test_messages_of_a_batch_larger_than_the_hold_go_in_several_writes(rabbit: Celery, target: str) -> None:
    """Proves a batch of large messages is not held whole in memory: past ``COALESCE_BYTES`` the held frames are
    sent, and every message still arrives in order."""
    from orch_outbox import amqpwire

    big = "x" * 100_000
    with _relay_connection(rabbit) as conn:
        conn.ensure_connection(max_retries=1)
        producer = rabbit.amqp.Producer(conn)
        _publish(rabbit, producer, _row(target, -1), declare=True)
        sizes = _count_writes(conn)
        with coalesced_writes(conn):
            for n in range(6):
                row = Dispatch(uuid.uuid4(), "cw_plain", target, 1, {"n": n, "pad": big}, 60.0, 0, None, 0, 0, None)
                _publish(rabbit, producer, row, declare=False)
        assert 2 <= len(sizes) < 6 and max(sizes) <= amqpwire.COALESCE_BYTES + 200_000, sizes
    assert _drain(rabbit, target, 20) == [-1, *range(6)]


def test_the_look_for_broker_notifications_is_made_once_per_batch(rabbit: Celery, target: str) -> None:
    """Proves py-amqp's look for a broker notification before each publish (a read that cannot wait) is made once
    in a batch, not once per message, that it is made again per batch, and that every message still arrives."""
    with _relay_connection(rabbit) as conn:
        conn.ensure_connection(max_retries=1)
        producer = rabbit.amqp.Producer(conn)
        _publish(rabbit, producer, _row(target, -1), declare=True)
        amqp_connection = conn.connection
        drain = amqp_connection.drain_events
        looks: list[float] = []

        def counted(timeout: float | None = None) -> Any:
            if timeout == 0:
                looks.append(timeout)
            return drain(timeout=timeout)

        amqp_connection.drain_events = counted
        for n in (0, 1):  # outside a block: a look per message (the counter sees py-amqp's looks)
            _publish(rabbit, producer, _row(target, n), declare=False)
        assert len(looks) == 2
        for batch in (range(2, 12), range(12, 22)):
            with coalesced_writes(conn):
                for n in batch:
                    _publish(rabbit, producer, _row(target, n), declare=False)
        assert len(looks) == 2 + 2, looks  # one per batch
        assert amqp_connection.drain_events is counted  # the instance's own attribute is back after the blocks
    assert _drain(rabbit, target, 40) == [-1, *range(22)]
