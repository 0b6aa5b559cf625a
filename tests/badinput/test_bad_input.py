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

This module holds the push-time kinds (1-12, 14); ``test_bad_settings.py`` the table prefixes and
the settings (13, 19); ``test_bad_worker_input.py`` the worker side.
"""

from __future__ import annotations

import json
import math
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import chain
from sqlalchemy.orm import Session

from orch_outbox import (
    ConfigurationError,
    InvalidInput,
    InvalidOption,
    Outbox,
    OutboxError,
    UnknownCommand,
)

from .helpers import (
    AWARE,
    NAIVE,
    WEEK,
    Meeting,
    Slot,
    never,
    refused,
    table_rows,
)
from conftest import make_app

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
    ("options", "fragment"),
    [
        pytest.param(lambda cb: {"link": cb}, "['link']", id="link"),
        pytest.param(lambda cb: {"link_error": [cb]}, "['link_error']", id="link-error"),
        pytest.param(lambda cb: {"task_id": "my-own-id"}, "['task_id']", id="task-id"),
        pytest.param(lambda cb: {"chain": [cb]}, "['chain']", id="chain"),
    ],
)
def test_a_plain_task_signature_with_callbacks_or_its_own_id_is_refused(
    outbox: Outbox, cmds: Any, options: Any, fragment: str
) -> None:
    """Kind 9c: a plain @app.task's signature carrying what Celery would run after it (``link``, ``link_error``,
    a ``chain``) or a chosen ``task_id`` raises InvalidOption naming it, where the outbox would otherwise keep
    the task and silently lose the callback (or return another id than the one asked for); nothing is written
    and the transaction stays usable. Celery's transport options on the same signature (``serializer``) are
    left out without an error, as on ``apply_async``."""
    name = f"{cmds.target}.plain"
    if name not in outbox.app.tasks:

        @outbox.app.task(name=name, shared=False)
        def plain(n: int) -> None:
            never()

        @outbox.app.task(name=f"{name}.after", shared=False)
        def after(n: int) -> None:
            never()

    plain_task, callback = outbox.app.tasks[name], outbox.app.tasks[f"{name}.after"].s()
    refused(outbox, cmds, lambda s: outbox.push(s, plain_task.s(1).set(**options(callback))), InvalidOption, fragment)
    with Session(outbox.engine) as session, session.begin():
        kept = outbox.push(session, plain_task.s(2).set(serializer="json"))
    assert outbox.get(kept).input == {"n": 2}


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
