"""The bad-input suites' fixtures: one outbox table per dialect for the push-time tests, and their commands."""

from __future__ import annotations

import datetime as dt
import types
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import (
    Outbox,
)

from .helpers import Meeting, Slot, never, unique_target
from conftest import make_app, unique_prefix


@pytest.fixture(scope="module", params=["sqlite", "pg"])
def outbox(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outbox]:
    """Overrides conftest's ``outbox``: ONE outbox table per dialect for all push-time tests of this module.

    Every push-time check compares the table before and after (``refused``), so tests sharing the
    table cannot see each other; creating a table per case would make the ~200 cases slow.
    """
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('badinput')}/outbox.sqlite3"
        shared = Outbox(make_app(), url, lock_buffer=2.0)
        shared.create_tables()
        yield shared
        shared.close()
        shared.engine.dispose()
    else:
        engine: sa.Engine = request.getfixturevalue("pg_engine")
        shared = Outbox(make_app(), engine, table_prefix=unique_prefix(), lock_buffer=2.0)
        shared.create_tables()
        yield shared
        shared.store.drop_all()
        shared.close()


@pytest.fixture(scope="module")
def cmds(outbox: Outbox) -> types.SimpleNamespace:
    """The commands of the push-time tests (never executed)."""
    target = unique_target("bad")

    @outbox.command(target=target)
    def send(to: str, subject: str = "hi") -> None:
        never()

    @outbox.command(target=target)
    def take(data: Any) -> None:
        never()

    @outbox.command(target=target)
    def book(meeting: Meeting) -> None:
        never()

    @outbox.command(target=target)
    def reserve(slot: Slot) -> None:
        never()

    @outbox.command(target=target)
    def remind(at: dt.datetime) -> None:
        never()

    return types.SimpleNamespace(target=target, send=send, take=take, book=book, reserve=reserve, remind=remind)
