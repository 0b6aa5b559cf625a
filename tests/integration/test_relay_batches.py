"""On Redis the relay sends a claimed batch in one pipeline, and a pipeline that fails loses nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from orch_outbox import Outbox

from .support import unique_target
from conftest import REDIS_URL, make_app, require

pytestmark = pytest.mark.pg


def _queue_length(outbox: Outbox, target: str) -> int:
    with outbox.app.connection_for_write() as conn:
        return int(conn.default_channel.client.llen(target))


def test_a_batch_is_one_redis_round_trip_and_a_failed_one_returns_to_pending(
    make_outbox: Callable[..., Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves the batched publish keeps guarantee 2 on Redis: a batch whose pipeline fails leaves no message and
    returns every row to pending with no retry used (the relay then backs off); the next run publishes the
    whole batch in one pipeline (one round trip for 25 messages, not 25), each message exactly once."""
    require("127.0.0.1", 6379, "Redis")
    outbox = make_outbox(app=make_app(REDIS_URL))
    target = unique_target("batch")

    @outbox.command(target=target)
    def noop(n: int) -> None: ...

    outbox.push_many(outbox.engine, [noop.s(i) for i in range(25)])
    real_execute = redis.client.Pipeline.execute
    executed: list[int] = []

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("the broker went away mid-batch")

    monkeypatch.setattr(redis.client.Pipeline, "execute", failing)
    assert outbox.relay_once() == 0
    rows = outbox.find(target=target, limit=100)
    assert {(r.status, r.retries_left) for r in rows} == {("pending", rows[0].retries)}
    monkeypatch.setattr(redis.client.Pipeline, "execute", real_execute)
    assert _queue_length(outbox, target) == 0

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        pushes = sum(1 for args, _ in self.command_stack if args[0] == "LPUSH")
        if pushes:  # (kombu's declarations of the queue run pipelines of their own)
            executed.append(pushes)
        return real_execute(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting)
    outbox.relay.broker_retry_at = 0.0  # past the backoff the failure started
    assert outbox.relay_once() == 25
    assert executed == [25]
    assert _queue_length(outbox, target) == 25
    assert {r.status for r in outbox.find(target=target, limit=100)} == {"dispatched"}
