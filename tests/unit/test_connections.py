"""What a push writes on (orch_outbox/connections.py), on a SQLite outbox: no Django, no server.

A push takes SQLAlchemy's own connections; an outbox's connection adapters add other kinds, and its
current connection is what a push given none writes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox

from conftest import make_app


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(make_app(), f"sqlite:///{tmp_path}/outbox.sqlite3")
    box.create_tables()

    @box.command(target="notes")
    def note(text: str) -> str:
        return text

    box.note = note  # type: ignore[attr-defined]
    yield box
    box.close()
    box.engine.dispose()


def test_a_push_without_a_connection_is_a_type_error_without_a_current_one(outbox: Any) -> None:
    """Proves that with no current connection, a push whose first argument is not a connection is refused as
    before (a TypeError naming what it got), for the command, its options and the outbox alike; nothing is
    written."""
    for push in (outbox.note.push, outbox.note.options(priority=1).push):
        with pytest.raises(TypeError, match="push needs a SQLAlchemy Session, Connection or Engine, not str"):
            push("ada")
    with pytest.raises(TypeError, match="not no connection"):
        outbox.push(outbox.note.s("ada"))
    assert outbox.count() == 0


def test_a_current_connection_takes_every_push_given_none(outbox: Any) -> None:
    """Proves that with ``outbox.connections.current`` set, every argument of ``cmd.push(...)`` is the command's
    and the push writes on the current connection (here an Engine: a transaction of its own), for the command,
    its options, ``outbox.push(sig)``, ``push_many``, ``push_batch`` and ``append_to_batch``; a connection given
    first still wins."""
    asked: list[int] = []

    def current() -> sa.Engine:
        asked.append(1)
        return outbox.engine

    outbox.connections.current = current
    note = outbox.note
    ids = [note.push("a"), note.options(priority=3).push(text="b"), outbox.push(note.s("c"))]
    ids += outbox.push_many([note.s("d"), note.s("e")])
    batch = outbox.push_batch([note.s("f")])
    ids += [*batch.member_ids, *outbox.append_to_batch(batch.id, [note.s("g")])]
    assert len(asked) == 6  # one per push
    assert [outbox.get(i).input["text"] for i in ids] == list("abcdefg")
    assert outbox.get(ids[1]).priority == 3
    with outbox.engine.begin() as conn:
        given = note.push(conn, "h")
    assert len(asked) == 6 and outbox.get(given).input == {"text": "h"}


def test_an_adapter_lends_a_connection_of_its_own_kind(outbox: Any) -> None:
    """Proves a connection adapter: an object of a kind the outbox does not know is pushed on through the
    context manager the adapter returns for it (entered for the push, left after it), other objects are left to
    the next adapter or refused; asking whether it recognises an object enters nothing."""

    class Handle:
        pass

    entered: list[str] = []

    def adapter(obj: Any) -> Any:
        if not isinstance(obj, Handle):
            return None

        @contextlib.contextmanager
        def lend() -> Iterator[sa.Connection]:
            entered.append("in")
            with outbox.engine.begin() as conn:
                yield conn
            entered.append("out")

        return lend()

    outbox.connections.adapters.append(adapter)
    assert outbox.connections.recognises(Handle()) and not outbox.connections.recognises("ada")
    assert entered == []
    command_id = outbox.note.push(Handle(), "ada")
    assert entered == ["in", "out"] and outbox.get(command_id).input == {"text": "ada"}
    with pytest.raises(TypeError, match="connection adapters recognises"):
        outbox.note.push(object(), "ada")
