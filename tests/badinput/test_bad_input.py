"""Bad input (guarantees 6 and 7): every kind is refused loudly, nothing is lost, nothing crashes.

For each kind of bad input this suite proves one of two things:

- **at push**: an ``orch_outbox`` exception whose message names the bad field, option or
  value is raised before anything is written; a command pushed earlier in the same
  transaction survives, the caller's transaction stays usable (a good command pushed
  after the error in the SAME transaction commits), and the table then holds exactly
  the good rows;
- **on the worker** (rows written by hand, forged or foreign messages): nothing runs that
  should not, the row is recorded ``failed`` with a clear error (or left untouched for a
  forged message), and the same in-process worker still completes a good command.

Push-time tests run on SQLite and PostgreSQL (this module's ``outbox`` fixture: one shared
table per dialect, each test checking only the rows it adds); settings, prefixes and worker
tests run on PostgreSQL, the workers in-process on Redis db 11 (and kombu's memory broker).
Every wait is bounded (``wait_until`` / ``drain`` / ``wait_for_status``); nothing sleeps.
Product bugs this suite found were fixed; each stays covered by the test that found it.

Already covered elsewhere, so not repeated here:

=============================================  ===============================================
``tests/unit/test_jsoncodec.py``               ``encode`` refusals value by value, the path in
                                               the message, signature binding, UTF-8 size count
``tests/unit/test_settings.py``                ``Settings.from_sources`` coercion / validation
                                               of every key, ``validate_prefix`` /
                                               ``validate_target`` unit cases
``tests/unit/test_naming_and_ids.py``          an unimportable dotted-path backoff
``tests/integration/test_transactions.py``     commit / rollback / savepoint of good pushes
``tests/integration/test_fencing.py``          forged start / write-back for another attempt
                                               or another command name (store level)
``tests/integration/test_cancel_heartbeat_``   ``UniqueConflict`` keeps the transaction usable;
``unique.py``                                  ``heartbeat(seconds)`` out of range
``tests/faults/test_messages.py``              the same hand-written-row and pickle attacks
                                               against real ``celery worker`` subprocesses
=============================================  ===============================================
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import types
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa
from celery import chain
from kombu import Exchange, Producer, Queue
from kombu.exceptions import ChannelError
from sqlalchemy.orm import Session

from orch_outbox import (
    ConfigurationError,
    InvalidInput,
    InvalidOption,
    Outbox,
    OutboxError,
    UnknownCommand,
    metadata_for,
)
from orch_outbox.store import Store
from orch_outbox.testing import drain, wait_for_status, wait_until
from orch_outbox.uuid7 import uuid7

from conftest import make_app, require, run_worker, unique_prefix

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


# -- 1-4. values JSON / jsonb cannot hold -------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        pytest.param({1, 2}, "a set", id="set"),
        pytest.param(b"raw", "a bytes", id="bytes"),
        pytest.param(object(), "a object", id="object"),
        pytest.param(lambda: 1, "a function", id="function"),
        pytest.param(1 + 2j, "a complex", id="complex"),
        pytest.param(Meeting, "the class Meeting", id="class-not-instance"),
    ],
)
def test_non_json_argument_is_refused(outbox: Outbox, cmds: Any, value: Any, fragment: str) -> None:
    """Kind 1: a set, bytes, an object, a function, a complex, a class as an argument raises InvalidInput
    naming the parameter (``data``) and the type; the transaction stays usable, nothing is written."""
    message = refused(outbox, cmds, lambda s: cmds.take.push(s, value), InvalidInput, fragment)
    assert message.startswith("data:"), message


@pytest.mark.parametrize(
    ("call", "where"),
    [
        pytest.param(lambda c: c.take.s(math.nan), "data:", id="nan"),
        pytest.param(lambda c: c.take.s(math.inf), "data:", id="inf"),
        pytest.param(lambda c: c.take.s({"a": [1, {"b": -math.inf}]}), "data['a'][1]['b']:", id="nested-minus-inf"),
        pytest.param(lambda c: c.take.s([Decimal("NaN")]), "data[0]:", id="decimal-nan"),
        pytest.param(lambda c: c.book.s(Meeting(AWARE, math.nan)), "meeting.minutes:", id="dataclass-field"),
    ],
)
def test_nan_and_infinity_are_refused_also_nested(outbox: Outbox, cmds: Any, call: Any, where: str) -> None:
    """Kind 2: NaN / infinity anywhere in the input raise InvalidInput whose message starts with the path
    to the bad number; the transaction stays usable, nothing is written."""
    message = refused(outbox, cmds, lambda s: outbox.push(s, call(cmds)), InvalidInput, "not valid JSON")
    assert message.startswith(where), message


@pytest.mark.parametrize(
    ("value", "where"),
    [
        pytest.param("a\x00b", "data:", id="in-string"),
        pytest.param({"key\x00": 1}, "data:", id="in-dict-key"),
        pytest.param(["ok", {"x": "\x00"}], "data[1]['x']:", id="nested"),
    ],
)
def test_nul_characters_are_refused(outbox: Outbox, cmds: Any, value: Any, where: str) -> None:
    """Kind 3: a NUL character in a string or a dict key (PostgreSQL's jsonb cannot hold one) raises
    InvalidInput naming where it is, before the database sees it (a jsonb error would abort the caller's
    transaction); the transaction stays usable."""
    message = refused(outbox, cmds, lambda s: cmds.take.push(s, value), InvalidInput, "NUL")
    assert message.startswith(where), message


@pytest.mark.parametrize(
    ("value", "where"),
    [
        pytest.param("\ud800", "data:", id="alone"),
        pytest.param("ok\udfffok", "data:", id="inside-text"),
        pytest.param({"\ud83d": 1}, "data:", id="dict-key"),
        pytest.param(["a", {"k": "\udc80"}], "data[1]['k']:", id="nested"),
    ],
)
def test_lone_surrogates_are_refused(outbox: Outbox, cmds: Any, value: Any, where: str) -> None:
    """Kind 4: a lone UTF-16 surrogate (not encodable as UTF-8) raises InvalidInput naming where it is,
    not a UnicodeEncodeError from the driver; the transaction stays usable."""
    message = refused(outbox, cmds, lambda s: cmds.take.push(s, value), InvalidInput, "not valid Unicode")
    assert message.startswith(where), message


def test_integer_too_long_for_json_is_refused_naming_the_field(outbox: Outbox, cmds: Any) -> None:
    """Kind 1b: an integer with more digits than Python will print as JSON raises InvalidInput naming
    ``data``; the transaction stays usable."""
    refused(outbox, cmds, lambda s: cmds.take.push(s, 10**5000), InvalidInput, "data")


# -- 5. size ---------------------------------------------------------------------------------


def test_input_over_max_bytes_is_refused_and_input_at_the_limit_is_accepted(outbox: Outbox, cmds: Any) -> None:
    """Kind 5: an input one byte over ``outbox_max_input_bytes`` raises InvalidInput naming the command and
    the setting; in the same transaction an input of exactly the limit is accepted, commits and is stored
    whole (the limit is inclusive and counts the compact JSON text)."""
    limit = outbox.settings.max_input_bytes
    overhead = len(json.dumps({"data": ""}, separators=(",", ":")))
    at_limit = "x" * (limit - overhead)
    refused(
        outbox,
        cmds,
        lambda s: cmds.take.push(s, at_limit + "x"),
        InvalidInput,
        "input of take",
        "outbox_max_input_bytes",
        str(limit + 1),
    )
    with Session(outbox.engine) as session, session.begin():
        big = cmds.take.push(session, at_limit)
    assert outbox.get(big).input == {"data": at_limit}
    with outbox.engine.begin() as conn:  # keep the shared table small for the other tests
        conn.execute(sa.delete(outbox.store.table).where(outbox.store.table.c.id == big))


# -- 6. naive datetimes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "where"),
    [
        pytest.param(lambda c: c.remind.s(NAIVE), "at:", id="top-level"),
        pytest.param(lambda c: c.book.s(Meeting(NAIVE)), "meeting.at:", id="dataclass"),
        pytest.param(lambda c: c.reserve.s(Slot(at=NAIVE)), "slot['at']:", id="pydantic"),
        pytest.param(lambda c: c.take.s([AWARE, NAIVE]), "data[1]:", id="in-list"),
    ],
)
def test_naive_datetimes_are_refused(outbox: Outbox, cmds: Any, call: Any, where: str) -> None:
    """Kind 6: a naive datetime at top level, in a dataclass, in a pydantic model (whose JSON dump would hide
    it) or in a list raises InvalidInput naming where; the transaction stays usable."""
    message = refused(outbox, cmds, lambda s: outbox.push(s, call(cmds)), InvalidInput, "naive datetime")
    assert message.startswith(where), message


# -- 7, 8, 10. timeout, retries, priority ---------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout", -1),
        ("timeout", 0),
        ("timeout", math.nan),
        ("timeout", math.inf),
        ("timeout", True),
        ("timeout", WEEK + 1),
        ("timeout", "60"),
        ("retries", -1),
        ("retries", True),
        ("retries", 1.5),
        ("retries", 1001),
        ("retries", "3"),
        ("priority", -1),
        ("priority", 256),
        ("priority", True),
        ("priority", 2.0),
        ("priority", "5"),
    ],
)
def test_bad_timeout_retries_priority_are_refused_at_push(outbox: Outbox, cmds: Any, option: str, value: Any) -> None:
    """Kinds 7, 8, 10: a negative, zero, NaN, infinite, bool, absurd (> 1 week) or textual timeout; a
    negative, bool, float, absurd (> 1000) or textual retry count; a priority outside 0..255, a bool, a
    float or text - each raises InvalidOption naming the option and the value; the transaction stays
    usable."""
    refused(
        outbox,
        cmds,
        lambda s: cmds.send.options(**{option: value}).push(s, "x@example.com"),
        InvalidOption,
        option,
        repr(value),
    )


@pytest.mark.parametrize(
    ("options", "exc", "fragment"),
    [
        pytest.param({"timeout": -1}, InvalidOption, "timeout", id="timeout-negative"),
        pytest.param({"timeout": 0}, InvalidOption, "timeout", id="timeout-zero"),
        pytest.param({"timeout": math.nan}, InvalidOption, "timeout", id="timeout-nan"),
        pytest.param({"timeout": WEEK * 2}, InvalidOption, "timeout", id="timeout-absurd"),
        pytest.param({"retries": -1}, InvalidOption, "retries", id="retries-negative"),
        pytest.param({"retries": False}, InvalidOption, "retries", id="retries-bool"),
        pytest.param({"retries": 5000}, InvalidOption, "retries", id="retries-absurd"),
        pytest.param({"priority": 300}, InvalidOption, "priority", id="priority-range"),
        pytest.param({"target": "a b"}, ConfigurationError, "invalid target 'a b'", id="target-space"),
        pytest.param({"target": "x;drop table y"}, ConfigurationError, "invalid target", id="target-semicolon"),
        pytest.param({"target": "email\n"}, ConfigurationError, "invalid target", id="target-newline"),
        pytest.param({"target": "q" * 201}, ConfigurationError, "invalid target", id="target-201"),
        pytest.param({"target": ""}, ConfigurationError, "invalid target ''", id="target-empty"),
        pytest.param({"target": "e\x00"}, ConfigurationError, "invalid target", id="target-nul"),
    ],
)
def test_bad_options_are_refused_at_decoration_and_nothing_is_registered(
    tmp_path: Path, options: dict[str, Any], exc: type[Exception], fragment: str
) -> None:
    """Kinds 7, 8, 10, 14 at decoration: ``@outbox.command(...)`` with a bad timeout, retry count, priority
    or hostile target raises (InvalidOption / ConfigurationError naming it) and registers no task, so a
    half-declared command can never be pushed or executed."""
    bare = Outbox(make_app(), f"sqlite:///{tmp_path}/never-opened.sqlite3")
    name = f"cmd_{uuid.uuid4().hex[:8]}"
    with pytest.raises(exc) as info:

        @bare.command(name=name, **options)
        def handler() -> None:
            never()

    assert fragment in str(info.value)
    assert name not in bare.app.tasks


# -- 9. options and the handler's signature ------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        pytest.param(lambda c, s: c.send.options(bogus=1).push(s, "x"), "'bogus'", id="options-bogus"),
        pytest.param(lambda c, s: c.send.options(Target="q").push(s, "x"), "'Target'", id="options-case"),
        pytest.param(
            lambda c, s: c.send.outbox.push(s, c.send.s("x").set(routing_key="rk")),
            "'routing_key'",
            id="signature-celery-only-option",
        ),
    ],
)
def test_unknown_push_option_is_refused(outbox: Outbox, cmds: Any, bad: Any, fragment: str) -> None:
    """Kind 9a: an unknown push option - through ``cmd.options(...)`` or a Celery option set on a signature
    that the outbox does not support - raises InvalidOption naming it and listing the known ones; the
    transaction stays usable."""
    refused(outbox, cmds, lambda s: bad(cmds, s), InvalidOption, fragment, "known:")


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        pytest.param(lambda c: c.send.s("a", "b", "c"), "too many positional arguments", id="too-many"),
        pytest.param(lambda c: c.send.s(), "missing a required argument: 'to'", id="missing"),
        pytest.param(lambda c: c.send.s("a", bogus=1), "unexpected keyword argument 'bogus'", id="unknown-kw"),
        pytest.param(lambda c: c.send.s("a", to="b"), "multiple values for argument 'to'", id="duplicate"),
    ],
)
def test_arguments_not_matching_the_handler_are_refused(outbox: Outbox, cmds: Any, call: Any, fragment: str) -> None:
    """Kind 9b: too many arguments, a missing one, an unknown keyword or a duplicate raise InvalidInput
    at push naming the mismatch (not a TypeError on the worker later); the transaction stays usable."""
    refused(
        outbox, cmds, lambda s: outbox.push(s, call(cmds)), InvalidInput, "arguments do not match the handler", fragment
    )


# -- 11. delay, schedule, expiry ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "exc", "fragments"),
    [
        pytest.param({"delay": -1}, InvalidOption, ("delay", "-1"), id="delay-negative"),
        pytest.param({"delay": math.nan}, InvalidOption, ("delay", "nan"), id="delay-nan"),
        pytest.param({"delay": math.inf}, InvalidOption, ("delay", "inf"), id="delay-inf"),
        pytest.param({"delay": True}, InvalidOption, ("delay", "True"), id="delay-bool"),
        pytest.param({"delay": "soon"}, InvalidOption, ("delay", "'soon'"), id="delay-text"),
        pytest.param({"countdown": "30"}, InvalidOption, ("delay", "'30'"), id="countdown-text"),
        pytest.param({"scheduled_at": NAIVE}, InvalidInput, ("scheduled_at", "naive"), id="scheduled-naive"),
        pytest.param({"scheduled_at": "2030-01-01"}, InvalidOption, ("scheduled_at", "str"), id="scheduled-text"),
        pytest.param({"scheduled_at": 1_900_000_000}, InvalidOption, ("scheduled_at", "int"), id="scheduled-epoch"),
        pytest.param({"eta": NAIVE}, InvalidInput, ("scheduled_at", "naive"), id="eta-naive"),
        pytest.param({"expires_at": NAIVE}, InvalidInput, ("expires_at", "naive"), id="expires-at-naive"),
        pytest.param({"expires": -5}, InvalidOption, ("expires", "-5"), id="expires-negative"),
        pytest.param({"expires": "later"}, InvalidOption, ("expires", "'later'"), id="expires-text"),
        pytest.param({"delay": 1e12}, InvalidOption, ("delay",), id="delay-huge"),
        pytest.param({"countdown": 1e12}, InvalidOption, ("delay",), id="countdown-huge"),
        pytest.param({"expires": 1e12}, InvalidOption, ("expires",), id="expires-huge"),
    ],
)
def test_bad_delay_schedule_and_expiry_are_refused(
    outbox: Outbox, cmds: Any, options: dict[str, Any], exc: type[Exception], fragments: tuple[str, ...]
) -> None:
    """Kind 11: a delay / countdown that is negative, NaN, infinite, a bool, text or absurdly large; a
    scheduled_at / eta / expires_at that is naive or not a datetime; an expires that is negative or text
    - each raises InvalidOption / InvalidInput naming the option (Celery's ``countdown`` / ``eta`` are
    reported under the outbox names they map to, ``delay`` / ``scheduled_at``); the transaction stays
    usable."""
    refused(outbox, cmds, lambda s: cmds.send.options(**options).push(s, "x@example.com"), exc, *fragments)


# -- 12. unknown commands ---------------------------------------------------------------------------


def test_unknown_commands_are_refused(outbox: Outbox, cmds: Any, tmp_path: Path) -> None:
    """Kind 12: pushing a signature that is not runnable by this app's outbox raises UnknownCommand naming
    it - Celery's own tasks (``celery.backend_cleanup``), the outbox's services, a name nobody registered, a
    command of ANOTHER outbox, a chain holding such a name - and a non-signature raises TypeError saying
    what is expected; after each the transaction stays usable and nothing is written. (Plain Celery tasks
    of the same app are pushable: see test_plain_tasks_only_when_allowed.)"""
    app = outbox.app
    existing = table_rows(outbox)

    other = Outbox(make_app(), f"sqlite:///{tmp_path}/other.sqlite3")  # never opened

    @other.command(name="only_on_the_other_outbox")
    def elsewhere() -> None:
        never()

    cases = [
        (app.signature("celery.backend_cleanup"), "'celery.backend_cleanup'"),
        (app.signature("orch_outbox.relay"), "'orch_outbox.relay'"),
        (app.signature("no.such.command"), "'no.such.command'"),
        (elsewhere.s(), "'only_on_the_other_outbox'"),
        (chain(cmds.send.s("a"), app.signature("no.such.command")), "'no.such.command'"),
    ]
    for call, fragment in cases:
        with Session(outbox.engine) as session, session.begin():
            with pytest.raises(UnknownCommand) as info:
                outbox.push(session, call)
            assert fragment in str(info.value)
            with pytest.raises(UnknownCommand):
                outbox.push_many(session, [cmds.send.s("first"), call])
            kept = cmds.send.push(session, "kept@example.com")
        assert outbox.get(kept).status == "pending"
    with Session(outbox.engine) as session, session.begin():
        with pytest.raises(TypeError, match="expected a command signature"):
            outbox.push(session, "send")  # type: ignore[arg-type]
        cmds.send.push(session, "last@example.com")
    added = [v for k, v in table_rows(outbox).items() if k not in existing]
    assert sorted(i["to"] for _, i in added) == ["kept@example.com"] * len(cases) + ["last@example.com"]


def test_push_many_with_one_bad_signature_writes_nothing(outbox: Outbox, cmds: Any) -> None:
    """Kind 20 (guarantee 7, nothing half-written): ``push_many`` with good signatures around one bad one raises
    InvalidInput naming the bad value and writes none of them (all rows are validated before the single
    INSERT); the same transaction then pushes the good ones and commits exactly those."""
    existing = table_rows(outbox)
    good = [cmds.send.s("a@example.com"), cmds.send.s("b@example.com")]
    refused(
        outbox,
        cmds,
        lambda s: outbox.push_many(s, [good[0], cmds.take.s({1, 2}), good[1]]),
        InvalidInput,
        "data: a set",
    )
    with Session(outbox.engine) as session, session.begin():
        ids = outbox.push_many(session, good)
    assert [outbox.get(i).input["to"] for i in ids] == ["a@example.com", "b@example.com"]
    assert len(table_rows(outbox)) == len(existing) + 4


# -- 13. table prefixes ------------------------------------------------------------------------------

HOSTILE_PREFIXES = ["x; drop table", "Orch_", "a" * 31, "orch_\n", "1abc", "", "or-ch_", "orch_commands --"]


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


@pytest.mark.parametrize("prefix", HOSTILE_PREFIXES)
def test_hostile_table_prefix_is_refused_and_nothing_is_created(
    pg_outbox: Outbox, pg_engine: sa.Engine, prefix: str
) -> None:
    """Kind 13: a prefix that is not a plain lowercase identifier (SQL injection, uppercase, 31 characters,
    trailing newline, leading digit, empty, dash) given to ``Outbox(...)`` raises ConfigurationError naming
    it at once, as do ``Store(...)`` and ``metadata_for(...)``; the app stays free for a correct Outbox; no
    table of that prefix is created, the existing outbox and its committed row are intact, and the caller's
    transaction stays usable."""
    target = unique_target("prefix")

    @pg_outbox.command(target=target)
    def good(n: int) -> None:
        never()

    kept = good.push(pg_engine, 1)
    app = make_app()
    with pytest.raises(ConfigurationError) as info:
        Outbox(app, pg_engine, table_prefix=prefix)
    assert f"invalid table prefix {prefix!r}" in str(info.value)
    Outbox(app, pg_engine, table_prefix=unique_prefix())  # the refused Outbox did not claim the app
    with pytest.raises(ConfigurationError, match="table prefix"):
        Store(pg_engine, prefix)
    with pytest.raises(ConfigurationError, match="table prefix"):
        metadata_for(prefix)
    with Session(pg_engine) as session, session.begin():
        with pytest.raises(ConfigurationError, match="table prefix"):
            Outbox(make_app(), pg_engine, table_prefix=prefix)
        after = good.push(session, 3)

    names = _tables(pg_engine)
    assert not {f"{prefix}commands", f"{prefix.lower()}commands", f"{prefix.strip()}commands"} & names
    assert pg_outbox.store.table.name in names
    assert {i: v[1] for i, v in table_rows(pg_outbox).items()} == {kept: {"n": 1}, after: {"n": 3}}


def test_hostile_prefix_from_environment_or_celery_config_is_refused(
    pg_outbox: Outbox, pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kind 13 through configuration: ``ORCH_OUTBOX_TABLE_PREFIX="x; drop table"`` makes ``Outbox(app)``
    of a configured app raise ConfigurationError naming the value; ``outbox_table_prefix = "Orch_"`` in the
    Celery config is refused at the first use; the existing outbox table is untouched."""
    monkeypatch.setenv("ORCH_OUTBOX_TABLE_PREFIX", "x; drop table")
    configured = make_app()
    assert configured.conf.accept_content == ["json"]  # reading the config configures the app
    with pytest.raises(ConfigurationError, match=re.escape("'x; drop table'")):
        Outbox(configured, pg_engine)
    monkeypatch.delenv("ORCH_OUTBOX_TABLE_PREFIX")

    app = make_app()
    app.conf.outbox_table_prefix = "Orch_"
    with pytest.raises(ConfigurationError, match="'Orch_'"):
        Outbox(app, pg_engine).create_tables()
    assert not {"x; drop tablecommands", "Orch_commands"} & _tables(pg_engine)
    assert pg_outbox.store.table.name in _tables(pg_engine)


def test_outbox_refused_for_bad_settings_leaves_the_app_free(pg_engine: sa.Engine) -> None:
    """Kind 13, nothing half-written on the app: after ``Outbox(app, table_prefix=<hostile>)`` is refused,
    the corrected ``Outbox(app, table_prefix=<good>)`` can be attached to the same Celery app."""
    app = make_app()
    assert app.conf.accept_content == ["json"]  # configured: the constructor validates at once
    with pytest.raises(ConfigurationError):
        Outbox(app, pg_engine, table_prefix="x; drop table")
    fixed = Outbox(app, pg_engine, table_prefix=unique_prefix())
    assert fixed.settings.table_prefix != "x; drop table"


# -- 14. targets at push time, unique keys, command names -------------------------------------------


@pytest.mark.parametrize(
    ("option", "target"),
    [
        ("target", "a b"),
        ("target", "x;drop table y"),
        ("target", "email\n"),
        ("target", "q" * 201),
        ("target", "-lead"),
        ("target", 5),
        ("queue", "x y"),
        ("queue", "bad/slash"),
        pytest.param("target", ""),
        pytest.param("queue", ""),
    ],
)
def test_hostile_target_is_refused_at_push(outbox: Outbox, cmds: Any, option: str, target: Any) -> None:
    """Kind 14 at push: a target (or Celery ``queue``) with spaces, a semicolon, a newline, 201 characters,
    a leading dash, a non-string or empty raises InvalidOption naming the value, through both
    ``cmd.options(...)`` and a signature's ``.set(...)``; the transaction stays usable."""
    refused(
        outbox,
        cmds,
        lambda s: cmds.send.options(**{option: target}).push(s, "x@example.com"),
        InvalidOption,
        f"invalid target {target!r}",
    )
    refused(
        outbox,
        cmds,
        lambda s: outbox.push(s, cmds.send.s("y@example.com").set(**{option: target})),
        InvalidOption,
        f"invalid target {target!r}",
    )


@pytest.mark.parametrize(
    "key",
    [
        "",
        "k" * 201,
        "a\x00b",
        5,
        "\ud800",
    ],
)
def test_hostile_unique_key_is_refused(outbox: Outbox, cmds: Any, key: Any) -> None:
    """Kind 14b: a unique_key that is empty, over 200 characters, holds a NUL, is not a string or is not
    valid Unicode raises InvalidOption naming ``unique_key``; the transaction stays usable."""
    refused(
        outbox, cmds, lambda s: cmds.send.options(unique_key=key).push(s, "x@example.com"), InvalidOption, "unique_key"
    )


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("n" * 201, id="201-chars"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a\ud800b", id="surrogate"),
    ],
)
def test_hostile_command_name_is_refused(outbox: Outbox, cmds: Any, name: str) -> None:
    """Kind 14c: a command name the table cannot hold is refused at decoration (an OutboxError), or else its
    push raises an OutboxError and leaves the caller's transaction usable."""

    def handler() -> None:
        never()

    try:
        cmd = outbox.command(name=name, target=cmds.target)(handler)
    except OutboxError as exc:
        assert "name" in str(exc)
        return
    refused(outbox, cmds, lambda s: cmd.push(s), OutboxError, "name")


# -- worker side: hand-written rows, forged and foreign messages ------------------------------------------


@pytest.fixture
def worker_outbox(pg_engine: sa.Engine) -> Iterator[Callable[..., Outbox]]:
    """``worker_outbox(broker=REDIS_DB11)``: an outbox on PostgreSQL with its own Celery app and table.

    Redis by default: an in-process worker on kombu's memory transport takes ~4 s to stop (its
    synchronous loop drains with a 2 s timeout), one on Redis a few milliseconds. Queue names are
    unique per test; their Redis keys are deleted afterwards.
    """
    made: list[Outbox] = []

    def make(broker: str = REDIS_DB11, **settings: Any) -> Outbox:
        if broker.startswith("redis"):
            require("127.0.0.1", 6379, "Redis")
        app = make_app(broker)
        app.conf.broker_transport_options = {"polling_interval": 0.02}  # the memory transport polls
        outbox = Outbox(
            app,
            pg_engine,
            table_prefix=unique_prefix(),
            lock_buffer=2.0,
            retry_backoff="fixed",
            retry_backoff_base=0.0,
            **settings,
        )
        outbox.create_tables()
        made.append(outbox)
        return outbox

    yield make
    for outbox in made:
        outbox.store.drop_all()
        outbox.close()
        if outbox.app.conf.broker_url.startswith("redis"):
            import redis

            client = redis.Redis.from_url(outbox.app.conf.broker_url)
            for target in TARGETS:
                client.delete(target, f"_kombu.binding.{target}", f"_kombu.binding_permanent.{target}")
            client.close()


def insert_row(outbox: Outbox, name: str, target: str, data: Any, *, retries: int = 0, priority: int = 0) -> uuid.UUID:
    """A row written by hand through the store's table object (any JSON as input), due now."""
    command_id = uuid7()
    now = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with outbox.engine.begin() as conn:
        conn.execute(
            sa.insert(outbox.store.table).values(
                id=command_id,
                name=name,
                target=target,
                status="pending",
                priority=priority,
                input=data,
                attempt=0,
                retries=retries,
                retries_left=retries,
                timeout=5.0,
                scheduled_at=now,
                created_at=now,
            )
        )
    return command_id


def insert_raw(outbox: Outbox, name: str, target: str, data: Any, *, retries: int = 0) -> uuid.UUID:
    """A row written by hand in plain SQL, the way someone with database access but no orch_outbox would."""
    command_id = uuid7()
    table = outbox.store.table.name  # a validated identifier
    with outbox.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {table} (id, name, target, status, priority, input, attempt, retries, retries_left, "
                "timeout, scheduled_at, created_at) VALUES (:id, :name, :target, 'pending', 0, CAST(:input AS jsonb), "
                "0, :retries, :retries, 5, now(), now())"
            ),
            {"id": command_id, "name": name, "target": target, "input": json.dumps(data), "retries": retries},
        )
    return command_id


def test_hand_written_rows_with_unregistered_names_end_failed_not_found(
    worker_outbox: Callable[..., Outbox], tmp_path: Path
) -> None:
    """Kind 15 (guarantee 6): rows written in plain SQL naming commands no worker registered - one of them
    ``os.system`` with a shell command as input, one ``builtins.exec`` - make the worker import and call
    nothing: each attempt is recorded ``not_found`` (NotRegistered), a retry is consumed per attempt, the
    command ends ``failed`` without ever starting; the same worker then completes a good command."""
    outbox = worker_outbox()
    target = unique_target("hand")
    ran: list[int] = []
    marker = tmp_path / "pwned"

    @outbox.command(target=target, retries=0)
    def work(n: int) -> int:
        ran.append(n)
        return n

    with run_worker(outbox.app, [target]):
        unknown = insert_raw(outbox, "no_such_command", target, {"x": 1}, retries=1)
        shell = insert_raw(outbox, "os.system", target, {"command": f"touch {marker}"})
        code = insert_raw(outbox, "builtins.exec", target, {"source": f"open({str(marker)!r}, 'w')"})
        drain(outbox, timeout=WAIT)
        for command_id, attempts in ((unknown, 2), (shell, 1), (code, 1)):
            info = outbox.get(command_id)
            assert (info.status, info.outcome, info.attempt, info.retries_left) == ("failed", "not_found", attempts, 0)
            assert info.error is not None and info.error.type == "NotRegistered"
            assert info.name in info.error.message
            assert info.started_at is None and info.worker is None
        assert not marker.exists()

        good = work.push(outbox.engine, 7)
        drain(outbox, timeout=WAIT)
        assert (outbox.get(good).status, outbox.get(good).output, ran) == ("completed", 7, [7])


def test_hand_written_rows_with_unusable_input_or_output_end_failed(worker_outbox: Callable[..., Outbox]) -> None:
    """Kind 16: rows written by hand for a REGISTERED command whose input names an unknown parameter, misses
    a required one, or is not a JSON object at all (a string, a list - on a ``hide_input`` command, whose
    message carries no arguments), and commands whose handler returns what JSON cannot hold (a set, NaN,
    more than ``outbox_max_input_bytes``): each ends ``failed`` (outcome ``failure``) with the reason
    recorded, the handler of a bad input never runs, and the same worker then completes a good command."""
    outbox = worker_outbox()
    target = unique_target("rows")
    ran: list[Any] = []
    limit = outbox.settings.max_input_bytes

    @outbox.command(target=target, retries=0)
    def greet(name: str) -> str:
        ran.append(name)
        return f"hello {name}"

    @outbox.command(target=target, retries=0, hide_input=True)
    def secret(token: str) -> None:
        ran.append(token)

    @outbox.command(target=target, retries=0)
    def answer(kind: str) -> Any:
        return {"set": {1, 2}, "nan": math.nan, "huge": "x" * (limit + 1)}[kind]

    with run_worker(outbox.app, [target]):
        unknown_param = insert_row(outbox, "greet", target, {"evil": 1})
        missing_param = insert_row(outbox, "greet", target, {})
        text_input = insert_row(outbox, "secret", target, "just a string")
        list_input = insert_row(outbox, "secret", target, [1, 2])
        outputs = {kind: answer.push(outbox.engine, kind) for kind in ("set", "nan", "huge")}
        drain(outbox, timeout=WAIT)

        expected = {
            unknown_param: "stored input names an unknown parameter 'evil'",
            missing_param: "missing 1 required positional argument: 'name'",
            text_input: "",
            list_input: "",
            outputs["set"]: "output of answer: a set cannot be stored as JSON",
            outputs["nan"]: "output of answer: nan is not valid JSON",
            outputs["huge"]: "the limit (outbox_max_input_bytes)",
        }
        for command_id, fragment in expected.items():
            info = outbox.get(command_id)
            assert (info.status, info.outcome, info.attempt) == ("failed", "failure", 1), info
            assert info.error is not None and fragment in info.error.message, info.error
            assert info.output is None
        assert ran == []

        good = greet.push(outbox.engine, "ok")
        drain(outbox, timeout=WAIT)
        assert outbox.get(good).output == "hello ok" and ran == ["ok"]


def test_hand_written_row_with_non_object_input_does_not_jam_the_relay(worker_outbox: Callable[..., Outbox]) -> None:
    """Kind 16b: a hand-written row whose input is a JSON list, for a command that publishes its arguments,
    is recorded ``failed`` and does not stop the relay: a good command claimed in the same batch (after
    the poison row, which has the higher priority) is published and completes."""
    outbox = worker_outbox()
    target = unique_target("poison")

    @outbox.command(target=target, retries=0)
    def greet(name: str) -> str:
        return name

    with run_worker(outbox.app, [target]):
        poison = insert_row(outbox, "greet", target, [1, 2], priority=10)
        good = greet.push(outbox.engine, "ok")
        drain(outbox, timeout=WAIT)
        assert outbox.get(good).status == "completed"
        assert outbox.get(poison).status == "failed"


def test_plain_tasks_only_when_allowed(tmp_path: Path) -> None:
    """Kind 12b: with ``outbox_plain_tasks`` off, pushing a plain Celery task of the app raises UnknownCommand
    naming it and writes nothing; with it on (the default) the same push is accepted."""
    strict = Outbox(make_app(), f"sqlite:///{tmp_path}/strict.sqlite3", plain_tasks=False)
    strict.create_tables()

    @strict.app.task(name="plain_cleanup", shared=False)
    def plain_cleanup(days: int) -> None:
        never()

    with pytest.raises(UnknownCommand, match="'plain_cleanup'"):
        strict.push(strict.engine, plain_cleanup.s(3))
    assert strict.find() == []
    lenient = Outbox(make_app(), f"sqlite:///{tmp_path}/lenient.sqlite3")
    lenient.create_tables()

    @lenient.app.task(name="plain_cleanup", shared=False)
    def accepted(days: int) -> None:
        never()

    pushed = lenient.push(lenient.engine, accepted.s(3))
    assert (lenient.get(pushed).name, lenient.get(pushed).input) == ("plain_cleanup", {"days": 3})
    strict.close()
    lenient.close()


def test_hand_written_row_naming_a_plain_celery_task_runs_nothing(worker_outbox: Callable[..., Outbox]) -> None:
    """Kind 15b (guarantee 6): with ``outbox_plain_tasks`` off, a hand-written row naming a plain Celery task
    registered on the same app (not an outbox command) does not run that task; the row ends ``failed``."""
    outbox = worker_outbox(plain_tasks=False)
    target = unique_target("plain")
    ran: list[Any] = []

    @outbox.app.task(name=f"plain_{uuid.uuid4().hex[:8]}", shared=False)
    def delete_account(**kwargs: Any) -> None:
        ran.append(kwargs)

    with run_worker(outbox.app, [target]):
        row = insert_row(outbox, delete_account.name, target, {"user_id": 42})

        def settled() -> bool:
            outbox.relay_once()
            outbox.rescue_once()
            return bool(ran) or outbox.get(row).is_final

        wait_until(settled, WAIT, what="the hand-written row to be settled")
        assert ran == [], "a plain Celery task ran from a hand-written outbox row"
        assert outbox.get(row).status == "failed"


TRIPPED: list[str] = []


def _tripwire(what: str) -> str:
    TRIPPED.append(what)
    return what


class Tripwire:
    """Unpickling this calls ``_tripwire``: proof that a worker deserialised pickle."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_tripwire, ("unpickled",))


def queued(channel: Any, queue: Queue) -> int:
    """Messages waiting in a queue (Redis drops the key of an empty list: then 0)."""
    try:
        return int(queue.bind(channel).queue_declare(passive=True).message_count)
    except ChannelError:
        return 0


@pytest.mark.parametrize("broker", ["memory://", REDIS_DB11])
def test_pickle_message_is_refused_and_the_worker_keeps_serving(
    worker_outbox: Callable[..., Outbox], broker: str
) -> None:
    """Kind 17 (guarantee 6, never pickle): a pickle-serialised message injected into a command queue (in
    memory and on Redis) carrying the task name and outbox header of a real dispatched attempt is refused
    before decoding: the object inside is never unpickled, the message is consumed (not redelivered), the
    targeted row is untouched, and a good command queued behind it completes on the same worker."""
    TRIPPED.clear()
    outbox = worker_outbox(broker)
    target = unique_target("pickle")
    ran: list[int] = []

    @outbox.command(target=target, retries=0)
    def work(n: int) -> int:
        ran.append(n)
        return n

    victim = work.push(outbox.engine, 1)
    [claimed] = outbox.store.claim(10, 60.0)  # dispatched, attempt 1, no message published for it
    before = outbox.get(victim)
    queue = Queue(target, Exchange(target, type="direct"), routing_key=target)
    with run_worker(outbox.app, [target]), outbox.app.connection_for_write() as conn:
        Producer(conn.default_channel, serializer="pickle").publish(
            [(), {"n": Tripwire()}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
            exchange=queue.exchange,
            routing_key=target,
            declare=[queue],
            headers={
                "lang": "py",
                "task": "work",
                "id": f"{victim}:1",
                "root_id": f"{victim}:1",
                "outbox": [str(victim), claimed.attempt, 5.0],
            },
        )
        good = work.push(outbox.engine, 2)
        assert outbox.relay_once() == 1
        assert wait_for_status(outbox, good, "completed", "failed", timeout=WAIT).status == "completed"
        # the queue is FIFO: the pickle message, ahead of the good one, has been handled and acked
        assert queued(conn.default_channel, queue) == 0
    assert TRIPPED == []
    assert ran == [2]
    assert outbox.get(victim) == before


def test_messages_without_a_valid_outbox_header_run_nothing(worker_outbox: Callable[..., Outbox]) -> None:
    """Kind 18: messages for a registered command that did not come from the relay run nothing and change
    nothing: ``app.send_task(name)`` with positional and with keyword arguments carry no outbox header
    (``cmd.delay`` / ``cmd.apply_async`` push through the outbox instead: see
    tests/integration/test_celery_fidelity.py), another carries a garbage header - each is dropped and
    counted ``malformed``; a forged header naming a real command that is still pending is dropped as
    ``stale`` (the fenced start needs a dispatched attempt) and that command later runs exactly once,
    through the relay. An eager ``cmd.apply()`` is dropped the same way (only a plain function call
    ``cmd(...)`` runs the handler, as for any Celery task). The worker keeps serving."""
    outbox = worker_outbox()
    target = unique_target("header")
    ran: list[int] = []

    @outbox.command(target=target, retries=0)
    def work(n: int) -> int:
        ran.append(n)
        return n

    pending = work.push(outbox.engine, 100)
    dropped = outbox.executor.dropped
    with run_worker(outbox.app, [target]):
        outbox.app.send_task("work", args=[1], queue=target)
        outbox.app.send_task("work", kwargs={"n": 2}, queue=target)
        outbox.app.send_task("work", kwargs={"n": 3}, queue=target, headers={"outbox": ["garbage", "x", None]})
        outbox.app.send_task("work", kwargs={"n": 4}, queue=target, headers={"outbox": [str(pending), 1, 5.0]})
        wait_until(
            lambda: dropped["malformed"] >= 3 and dropped["stale"] >= 1,
            WAIT,
            what="the worker to drop the four foreign messages",
        )
        assert ran == []
        info = outbox.get(pending)
        assert (info.status, info.attempt, info.started_at) == ("pending", 0, None)

        assert work.apply((5,)).get() is None
        assert ran == [] and dropped["malformed"] == 4

        drain(outbox, timeout=WAIT)
        assert (outbox.get(pending).status, ran) == ("completed", [100])
    assert (dropped["malformed"], dropped["stale"]) == (4, 1)


# -- 19. settings from the environment --------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("ORCH_OUTBOX_BATCH_SIZE", "abc", "ORCH_OUTBOX_BATCH_SIZE"),
        ("ORCH_OUTBOX_POLL_INTERVAL", "soon", "ORCH_OUTBOX_POLL_INTERVAL"),
        ("ORCH_OUTBOX_POLL_INTERVAL", "-1", "outbox_poll_interval"),
        ("ORCH_OUTBOX_DEFAULT_TIMEOUT", "nan", "ORCH_OUTBOX_DEFAULT_TIMEOUT"),
        ("ORCH_OUTBOX_MAX_INPUT_BYTES", "1e6", "ORCH_OUTBOX_MAX_INPUT_BYTES"),
        ("ORCH_OUTBOX_DEFAULT_TARGET", "a b", "invalid target 'a b'"),
    ],
)
def test_invalid_environment_settings_are_refused_naming_the_setting(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    """Kind 19: a setting of the wrong type in the environment (``ORCH_OUTBOX_BATCH_SIZE=abc``, a word or
    NaN for a number) makes ``Outbox(app)`` of a configured app raise ConfigurationError naming the
    variable; a well-typed but out-of-range value (``ORCH_OUTBOX_POLL_INTERVAL=-1``) names the setting
    it sets (``outbox_poll_interval``), a hostile default target names the value."""
    monkeypatch.setenv(variable, value)
    app = make_app()
    assert app.conf.accept_content == ["json"]  # configured, as in a started worker or beat
    with pytest.raises(ConfigurationError) as info:
        Outbox(app, pg_engine)
    assert named in str(info.value)


def test_push_under_invalid_environment_is_refused_and_transaction_stays_usable(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kind 19 at push: an outbox whose settings were not read yet, pushed to while
    ``ORCH_OUTBOX_BATCH_SIZE=abc``, raises ConfigurationError naming the variable before writing; once the
    variable is fixed, the same transaction pushes and commits exactly one row."""
    prefix = unique_prefix()
    store = Store(pg_engine, prefix)
    store.create_all()
    try:
        outbox = Outbox(make_app(), pg_engine, table_prefix=prefix)

        @outbox.command(target="env-q")
        def send(to: str) -> None:
            never()

        monkeypatch.setenv("ORCH_OUTBOX_BATCH_SIZE", "abc")
        with Session(pg_engine) as session, session.begin():
            with pytest.raises(ConfigurationError, match="ORCH_OUTBOX_BATCH_SIZE: expected int, got 'abc'"):
                send.push(session, "a@example.com")
            monkeypatch.delenv("ORCH_OUTBOX_BATCH_SIZE")
            good = send.push(session, "b@example.com")
        assert {i: v[1] for i, v in table_rows(outbox).items()} == {good: {"to": "b@example.com"}}
    finally:
        store.drop_all()


def test_invalid_environment_is_refused_when_the_app_gets_configured(
    pg_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kind 19 at start-up: with ``ORCH_OUTBOX_BATCH_SIZE=abc``, an Outbox on a not yet configured app
    stops ``celery worker`` and ``celery beat`` of that app at start (their init signals raise SystemExit
    naming the variable) instead of letting them start with invalid settings; other apps are unaffected."""
    from celery import signals

    class Starting:  # what worker_init / beat_init send: the worker or beat, holding its app
        def __init__(self, app: Any) -> None:
            self.app = app

    monkeypatch.setenv("ORCH_OUTBOX_BATCH_SIZE", "abc")
    app = make_app()
    assert not app.configured
    Outbox(app, pg_engine)
    for signal in (signals.worker_init, signals.beat_init):
        with pytest.raises(SystemExit, match="ORCH_OUTBOX_BATCH_SIZE"):
            signal.send(sender=Starting(app))
    signals.worker_init.send(sender=Starting(make_app()))
