"""What the bad-input suites share: value types, unique queue names, and the check that a push was refused."""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
import uuid
from collections.abc import Callable
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from orch_outbox import (
    Outbox,
    OutboxError,
)

#: Redis database this suite may use (the other suites use other ones).
REDIS_DB11 = "redis://127.0.0.1:6379/11"
#: Longest wait for anything a worker does in this file.
WAIT = 15.0
AWARE = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
NAIVE = dt.datetime(2030, 1, 1, 12, 0)
WEEK = 7 * 24 * 3600


@dataclasses.dataclass
class Meeting:
    at: dt.datetime
    minutes: float = 30.0


class Slot(pydantic.BaseModel):
    at: dt.datetime


#: Every queue name this module made (their Redis keys are deleted after each worker test).
TARGETS: list[str] = []


def unique_target(what: str) -> str:
    """A queue of this test alone (the in-memory broker is shared by the whole process)."""
    TARGETS.append(f"{what}-{uuid.uuid4().hex[:10]}")
    return TARGETS[-1]


def never(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("push-time tests never execute a handler")


def table_rows(outbox: Outbox) -> dict[uuid.UUID, tuple[str, Any]]:
    """Every row of the outbox table, read on a connection of its own: id -> (name, input)."""
    t = outbox.store.table
    with outbox.engine.connect() as conn:
        return {r.id: (r.name, r.input) for r in conn.execute(sa.select(t.c.id, t.c.name, t.c.input))}


def refused(
    outbox: Outbox,
    cmds: types.SimpleNamespace,
    bad: Callable[[Session], Any],
    exc: type[BaseException] = OutboxError,
    *fragments: str,
) -> str:
    """Run ``bad(session)`` between two good pushes of ONE transaction; returns the error message.

    Proves: ``bad`` raises ``exc`` whose message holds every fragment; the push before it
    is not lost; the transaction is still usable (the push after it works and commits);
    the table holds exactly the two good rows, so nothing of the bad push was written.
    """
    existing = table_rows(outbox)
    with Session(outbox.engine) as session, session.begin():
        before = cmds.send.push(session, "before@example.com")
        with pytest.raises(exc) as info:
            bad(session)
        after = cmds.send.push(session, "after@example.com")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert table_rows(outbox) == {
        **existing,
        before: ("send", {"to": "before@example.com"}),
        after: ("send", {"to": "after@example.com"}),
    }
    assert outbox.get(after).status == "pending"
    return message
