"""The relay's batched publisher confirms, against a scripted channel (no broker)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import pytest

from orch_outbox.relay import _Confirms
from orch_outbox.store import Dispatch


class ScriptedChannel:
    """A channel in confirm mode whose broker answers with the frames given to ``script``."""

    def __init__(self) -> None:
        self.events: dict[str, set[Any]] = defaultdict(set)
        self.frames: list[tuple[str, int, bool]] = []
        self.selected = False
        self.connection = self

    def confirm_select(self) -> None:
        self.selected = True

    def basic_publish(self, *args: Any, **kwargs: Any) -> None:
        """A publish: the broker numbers it (the confirms count it where it happens)."""

    def drain_events(self, timeout: float | None = None) -> None:
        if not self.frames:
            raise TimeoutError("no frame")  # what a silent broker looks like to the caller
        kind, tag, multiple = self.frames.pop(0)
        for callback in self.events[kind]:
            callback(tag, multiple)


def items(n: int) -> list[Dispatch]:
    return [Dispatch(uuid.uuid4(), "cmd", "q", 1, {}, 5.0, 0) for _ in range(n)]


def send(confirms: _Confirms, item: Dispatch, messages: int = 1) -> None:
    """What the relay does per command: name it, then publish its message(s) on the channel."""
    confirms.expect(item)
    for _ in range(messages):
        confirms.channel.basic_publish()


def test_acks_single_and_multiple_settle_the_batch() -> None:
    """One multiple ack up to 3 and single acks for 4 and 5 settle five messages; nothing is returned as nacked."""
    channel = ScriptedChannel()
    confirms = _Confirms(channel)
    assert channel.selected
    for item in items(5):
        send(confirms, item)
    channel.frames = [("basic_ack", 3, True), ("basic_ack", 5, False), ("basic_ack", 4, False)]
    assert confirms.wait(1.0) == []
    assert confirms.pending == {}


def test_nacked_messages_are_returned_for_undispatch() -> None:
    """A nack of message 2 and a multiple nack up to 4 return exactly those rows; tags keep counting across
    batches on the same channel."""
    channel = ScriptedChannel()
    confirms = _Confirms(channel)
    first = items(2)
    for item in first:
        send(confirms, item)
    channel.frames = [("basic_ack", 1, False), ("basic_nack", 2, False)]
    assert confirms.wait(1.0) == [first[1]]
    second = items(2)  # tags 3 and 4
    for item in second:
        send(confirms, item)
    channel.frames = [("basic_nack", 4, True)]
    assert sorted(map(str, (i.id for i in confirms.wait(1.0)))) == sorted(str(i.id) for i in second)


def test_a_broker_that_never_confirms_raises() -> None:
    """No confirm at all: wait raises instead of reporting the batch as published (the relay then returns
    the rows to pending)."""
    channel = ScriptedChannel()
    confirms = _Confirms(channel)
    send(confirms, items(1)[0])
    with pytest.raises(TimeoutError):
        confirms.wait(0.05)


def test_a_sent_event_on_the_same_channel_is_counted_with_its_command() -> None:
    """With task_send_sent_event Celery publishes two messages per command on the relay's channel: tags 1-2
    are the first command, 3-4 the second. An ack of tag 1 alone settles nothing; a nack of the second's event
    message (tag 4) returns that command only; no timeout waiting for tags that were never the commands'."""
    channel = ScriptedChannel()
    confirms = _Confirms(channel)
    first, second = items(2)
    send(confirms, first, messages=2)
    send(confirms, second, messages=2)
    channel.frames = [("basic_ack", 1, False)]
    with pytest.raises(TimeoutError):
        confirms.wait(0.05)
    channel.frames = [("basic_ack", 3, True), ("basic_nack", 4, False)]
    assert confirms.wait(1.0) == [second]
    assert confirms.pending == {}
