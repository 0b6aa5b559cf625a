"""The relay publishes a command to the queue its push was routed to; Celery's router is not asked again (RabbitMQ).

A push asks Celery's router (``task_routes``) with the call's own arguments and keeps the
queue as the row's ``target``. The message carries the command's input as keyword
arguments: a router function given the message's arguments could answer otherwise, or
fail. The relay publishes through ``send_task`` when a ``before_task_publish`` receiver
is connected (OpenTelemetry's Celery instrumentation, an error reporter's, a user's own),
and through its own messages otherwise; both paths are checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from celery import signals

from orch_outbox import Outbox

from .support import unique_target
from conftest import AMQP_URL, make_app, require, unique_prefix
from support.broker import delete_queue, queue_depth

pytestmark = pytest.mark.pg


@contextlib.contextmanager
def _publish_receiver(connected: bool) -> Iterator[list[str]]:
    """A ``before_task_publish`` receiver while the block runs (the relay then publishes through send_task)."""
    seen: list[str] = []

    def receiver(sender: Any = None, headers: Any = None, **_: Any) -> None:
        seen.append(str((headers or {}).get("id")))

    if connected:
        signals.before_task_publish.connect(receiver, weak=False)
    try:
        yield seen
    finally:
        if connected:
            signals.before_task_publish.disconnect(receiver)


@pytest.mark.parametrize("receiver", [True, False], ids=["send-task", "own-messages"])
def test_the_relay_publishes_to_the_queue_the_push_was_routed_to(pg_engine: sa.Engine, receiver: bool) -> None:
    """Proves a command routed by a router function of its positional argument reaches that queue: the router
    is asked once per push, with the call's arguments, and never by the relay (which, through send_task,
    used to ask it again with the message's keyword arguments: this router then raised on ``args[0]`` and
    every run reported the broker unavailable, the command left pending for ever). Each queue holds its
    command; both commands are dispatched; a publish receiver saw both messages on the send_task path."""
    require("127.0.0.1", 5672, "RabbitMQ")
    app = make_app(AMQP_URL)
    prefix = unique_target("region")
    asked: list[tuple[Any, Any]] = []

    def by_region(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> Any:
        if not name.startswith(prefix):
            return None
        asked.append((args, kwargs))
        return {"queue": f"{prefix}-{args[0]}"}

    app.conf.task_routes = [by_region]
    outbox = Outbox(app, pg_engine, table_prefix=unique_prefix())
    outbox.create_tables()

    @outbox.command(name=f"{prefix}.ship")
    def ship(region: str) -> None: ...

    queues = [f"{prefix}-eu", f"{prefix}-us"]
    try:
        with _publish_receiver(receiver) as seen:
            ids = [ship.push(pg_engine, "eu"), ship.push(pg_engine, "us")]
            assert outbox.relay_once() == 2
        assert [outbox.get(i).target for i in ids] == queues
        assert [outbox.get(i).status for i in ids] == ["dispatched", "dispatched"]
        assert [queue_depth(AMQP_URL, q, missing_ok=False) for q in queues] == [1, 1]
        assert asked == [(("eu",), {}), (("us",), {})]
        assert seen == ([str(i) for i in ids] if receiver else [])
    finally:
        for queue in queues:
            delete_queue(AMQP_URL, queue)
        outbox.store.drop_all()
        outbox.close()
