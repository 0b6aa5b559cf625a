"""The relay's own task messages are the messages ``send_task`` would publish, on RabbitMQ and on Redis.

The relay builds a command's message itself when nothing could tell the difference
(``orch_outbox/messages.py``). These tests publish the same claimed row both ways into a
real broker, read both messages back and compare everything a worker, Flower or a
broker sees: headers, properties, body, exchange and routing key. And they prove the
relay falls back to ``send_task`` where Celery would do more for a message.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, signals

from orch_outbox.amqpwire import lean_messages
from orch_outbox.messages import Messages
from orch_outbox.relay import PUBLISH_RETRY_POLICY
from orch_outbox.store import Dispatch

from .support import target_queue
from conftest import AMQP_URL, REDIS_URL, make_app, require

BROKERS = [
    pytest.param((AMQP_URL, 5672, "RabbitMQ"), id="rabbitmq"),
    pytest.param((REDIS_URL, 6379, "Redis"), id="redis"),
]


@pytest.fixture(params=BROKERS)
def app(request: pytest.FixtureRequest) -> Celery:
    url, port, what = request.param
    require("127.0.0.1", port, what)
    app = make_app(url)

    @app.task(name="msg_plain", shared=False)
    def plain(**kwargs: Any) -> None: ...

    @app.task(name="msg_limited", shared=False, time_limit=30, queue="elsewhere")
    def limited(**kwargs: Any) -> None: ...

    return app


@pytest.fixture
def target(app: Celery) -> Iterator[str]:
    with target_queue(app, "msg") as name:
        yield name


def _row(name: str, target: str, expires: bool) -> Dispatch:
    expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1) if expires else None
    return Dispatch(uuid.uuid4(), name, target, 3, {"to": "ada", "n": [1, 2]}, 60.0, 0, expires_at, 4, 2, None)


def _read(app: Celery, target: str) -> Any:
    with app.connection_for_write() as conn:
        queue = app.amqp.queues[target].bind(conn.default_channel)
        for _ in range(100):  # bounded: Redis and RabbitMQ hand a published message over at once
            message = queue.get(no_ack=True)
            if message is not None:
                return message
    raise AssertionError(f"no message in {target}")


def _publish_both(app: Celery, row: Dispatch) -> tuple[Any, Any]:
    """``row`` published by ``send_task`` and by :class:`Messages`; both messages as the broker hands them over.

    The relay's message goes as the relay sends it: on RabbitMQ with its properties encoded by ``LeanMessage``."""
    headers = {"outbox": [str(row.id), row.attempt, row.timeout]}
    messages = Messages(app, PUBLISH_RETRY_POLICY, persistent=True)  # Celery's delivery mode, as send_task's
    with app.connection_for_write() as conn:
        producer = app.amqp.Producer(conn)
        app.send_task(
            row.name,
            kwargs=row.input,
            argsrepr="()",
            kwargsrepr=repr(row.input),
            serializer="json",
            task_id=str(row.id),
            queue=row.target,
            headers=headers,
            expires=row.expires_at,
            retries=row.retries - row.retries_left,
            producer=producer,
            retry_policy=PUBLISH_RETRY_POLICY,
        )
        by_celery = _read(app, row.target)
        lean_messages(producer.channel)
        messages.publish(producer, row, row.input, repr(row.input), headers, {}, declare=True, retry=True)
        by_relay = _read(app, row.target)
    return by_celery, by_relay


@pytest.mark.parametrize("expires", [False, True], ids=["no-expiry", "expiry"])
def test_the_relays_message_is_the_one_send_task_publishes(app: Celery, target: str, expires: bool) -> None:
    """Proves a worker, Flower and the broker see the same message either way: same headers, properties, body,
    content type, exchange and routing key (the expiry's broker TTL within the second between the two)."""
    row = _row("msg_plain", target, expires)
    by_celery, by_relay = _publish_both(app, row)
    assert by_relay.headers == by_celery.headers
    assert by_relay.decode() == by_celery.decode()
    assert (by_relay.content_type, by_relay.content_encoding) == (by_celery.content_type, by_celery.content_encoding)
    celery_props, relay_props = dict(by_celery.properties), dict(by_relay.properties)
    if expires:
        ttl_celery, ttl_relay = float(celery_props.pop("expiration")), float(relay_props.pop("expiration"))
        assert abs(ttl_celery - ttl_relay) < 1000, (ttl_celery, ttl_relay)  # milliseconds
    relay_props.pop("delivery_tag", None), celery_props.pop("delivery_tag", None)
    relay_props.pop("body_encoding", None), celery_props.pop("body_encoding", None)
    assert {k: v for k, v in relay_props.items() if k != "delivery_info"} == {
        k: v for k, v in celery_props.items() if k != "delivery_info"
    }
    for key in ("exchange", "routing_key"):
        assert by_relay.delivery_info[key] == by_celery.delivery_info[key]


def test_the_relays_send_task_goes_where_celerys_own_routing_sends_it(app: Celery, target: str) -> None:
    """Proves the router the relay gives ``send_task`` (the row's target, the app's routes not asked again) sends a
    task's message as Celery's own router does when no route applies: the same exchange, routing key, headers
    and body, for a plain task and for one whose own options name another queue (the row's target wins)."""
    messages = Messages(app, PUBLISH_RETRY_POLICY)
    for name in ("msg_plain", "msg_limited"):
        row = _row(name, target, expires=False)
        read = []
        with app.connection_for_write() as conn:
            producer = app.amqp.Producer(conn)
            for router in (None, messages.target_router):
                app.send_task(
                    name, kwargs=row.input, task_id=str(row.id), queue=target, producer=producer, router=router
                )
                read.append(_read(app, target))
        by_celery, by_relay = read
        assert by_relay.headers == by_celery.headers
        assert by_relay.decode() == by_celery.decode()
        for key in ("exchange", "routing_key"):
            assert by_relay.delivery_info[key] == by_celery.delivery_info[key]


def test_send_task_is_used_where_celery_would_do_more(app: Celery) -> None:
    """Proves the relay keeps Celery's own path where a message is more than its row: a task with execution options
    of its own, a receiver of the publish signals, ``task_send_sent_event``, compression."""
    messages = Messages(app, PUBLISH_RETRY_POLICY)
    assert messages.direct("msg_plain")
    assert not messages.direct("msg_limited")  # its time limit and queue are part of its message

    def hook(**kwargs: Any) -> None: ...

    signals.before_task_publish.connect(hook)
    try:
        assert not messages.direct("msg_plain")
    finally:
        signals.before_task_publish.disconnect(hook)
    assert messages.direct("msg_plain")
    for setting in ("task_send_sent_event", "task_compression"):
        other = make_app(app.conf.broker_url)
        other.conf[setting] = True if setting == "task_send_sent_event" else "zlib"
        assert not Messages(other, PUBLISH_RETRY_POLICY).direct("msg_plain")


@pytest.mark.parametrize("persistent", [False, True], ids=["default", "persistent"])
def test_command_messages_are_transient_unless_persistent_messages(app: Celery, target: str, persistent: bool) -> None:
    """Proves the delivery mode a broker sees: transient (1) by default, since the database keeps the command
    and a lost message is redispatched from it; Celery's persistent (2) with ``outbox_persistent_messages``."""
    if not app.conf.broker_url.startswith("amqp"):
        pytest.skip("delivery modes are RabbitMQ's")
    row = _row("msg_plain", target, expires=False)
    with app.connection_for_write() as conn:
        Messages(app, PUBLISH_RETRY_POLICY, persistent).publish(
            app.amqp.Producer(conn), row, row.input, "", {}, {}, declare=True, retry=True
        )
    assert _read(app, target).properties["delivery_mode"] == (2 if persistent else 1)
