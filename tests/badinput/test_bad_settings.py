"""Bad input, continued (see test_bad_input.py): hostile table prefixes and settings from the environment."""

from __future__ import annotations

import re
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from orch_outbox import (
    ConfigurationError,
    Outbox,
    metadata_for,
)
from orch_outbox.store import Store

from .helpers import (
    never,
    table_rows,
    unique_target,
)
from conftest import make_app, unique_prefix

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
