"""orch_outbox.contrib.django in this process: pushes on Django's own connection, its settings, its URL.

The Django project is the example's (examples/django), set up on a scratch database by
``support.django_site``; each test that needs tables of its own gets a ``DjangoOutbox`` with a
table prefix of its own (``box``), on Django's database. Nothing here runs a worker
(tests/e2e/test_django.py does).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import CommandNotFound, TablesMissing
from orch_outbox.contrib.django import DjangoOutbox, Unowned, find_outbox, url_of
from orch_outbox.errors import ConfigurationError

from .support import integration_prefix, new_app, unique_target
from support.django_site import Site, django_site

__all__ = ["django_site"]  # the fixture, imported

PG = {"ENGINE": "django.db.backends.postgresql", "NAME": "shop", "USER": "app", "PASSWORD": "s3:cret"}


class Rollback(Exception):
    pass


@pytest.fixture
def box(django_site: Site) -> Iterator[Any]:
    """A DjangoOutbox with tables of its own on Django's database, and its command ``note(text) -> str``."""
    outbox = DjangoOutbox(new_app(), table_prefix=integration_prefix())
    outbox.create_tables()

    @outbox.command(target=unique_target("notes"))
    def note(text: str) -> str:
        return text

    outbox.note = note
    try:
        yield outbox
    finally:
        from django.db import connections

        connections.close_all()
        outbox.store.drop_all()
        outbox.close()
        outbox.engine.dispose()


def rows_on_django(box: Any) -> int:
    """The rows of the box's table as Django's connection sees them (inside its transaction, if one is open)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {box.settings.table_prefix}commands")
        return int(cursor.fetchone()[0])


def seen_elsewhere(box: Any, command_id: Any) -> bool:
    """Whether the box's own engine (another connection) sees the command."""
    try:
        box.get(command_id)
    except CommandNotFound:
        return False
    return True


def test_url_of_a_django_database() -> None:
    """Proves the outbox's URL is derived from a DATABASES entry: psycopg 3, user and password (quoted), host,
    port, name, the libpq options among OPTIONS (others dropped), a Unix socket directory as libpq's host; and
    that a database other than PostgreSQL is refused with the setting to use instead."""
    url = sa.make_url(url_of({**PG, "HOST": "db.internal", "PORT": "6432", "OPTIONS": {"sslmode": "require"}}))
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == (
        "postgresql+psycopg",
        "app",
        "s3:cret",
        "db.internal",
        6432,
        "shop",
    )
    assert dict(url.query) == {"sslmode": "require"}
    socket = sa.make_url(url_of({**PG, "HOST": "/run/postgresql", "OPTIONS": {"pool": True, "application_name": "a"}}))
    assert socket.host is None and dict(socket.query) == {"host": "/run/postgresql", "application_name": "a"}
    with pytest.raises(ConfigurationError, match="CELERY_OUTBOX_DATABASE_URL"):
        url_of({"ENGINE": "django.db.backends.sqlite3", "NAME": "db.sqlite3"})


def test_unowned_never_commits_rolls_back_closes_or_changes_the_connection() -> None:
    """Proves the proxy SQLAlchemy gets: commit, rollback and close reach nothing of the real connection;
    setting an attribute (autocommit, isolation level) is refused; everything else is the real connection's."""

    class Raw:
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.autocommit = True

        def commit(self) -> None:
            self.calls.append("commit")

        def rollback(self) -> None:
            self.calls.append("rollback")

        def close(self) -> None:
            self.calls.append("close")

        def cursor(self) -> str:
            self.calls.append("cursor")
            return "a cursor"

    raw = Raw()
    lent = Unowned(raw)
    lent.commit()
    lent.rollback()
    lent.close()
    assert lent.cursor() == "a cursor" and lent.autocommit is True
    with pytest.raises(AttributeError, match="never changes Django's connection"):
        lent.autocommit = False
    assert raw.calls == ["cursor"] and raw.autocommit is True


@pytest.mark.pg
def test_a_push_inside_atomic_is_in_djangos_transaction(box: Any) -> None:
    """Proves a push with no connection, inside ``atomic()``, writes at once on Django's connection in Django's
    transaction: Django's connection sees the row inside the block, the outbox's own engine does not; Django's
    rollback drops it, a nested block's rollback (a savepoint) drops only its own; Django's connection is the
    same open one afterwards, back in autocommit."""
    from django.db import connection, transaction

    connection.ensure_connection()
    raw = connection.connection
    with pytest.raises(Rollback), transaction.atomic():
        command_id = box.note.push("rolled back")
        assert rows_on_django(box) == 1 and not seen_elsewhere(box, command_id)
        raise Rollback
    assert rows_on_django(box) == 0 and not seen_elsewhere(box, command_id)
    assert connection.connection is raw and not raw.closed
    assert connection.get_autocommit() and not connection.in_atomic_block
    with transaction.atomic():
        kept = box.note.push("kept")
        with pytest.raises(Rollback), transaction.atomic():  # a savepoint
            undone = box.note.push("undone with its savepoint")
            raise Rollback
    assert box.get(kept).input == {"text": "kept"} and box.get(kept).status == "pending"
    assert not seen_elsewhere(box, undone)


@pytest.mark.pg
def test_every_push_form_writes_on_djangos_connection(box: Any) -> None:
    """Proves every way of pushing takes Django's connection, given or current, inside ``atomic()``:
    ``cmd.push(x)``, ``cmd.push(connections["default"], x)``, ``outbox.push(sig)``, ``cmd.options(...).push``,
    ``push_many`` of 60 calls (COPY), ``push_batch`` and ``append_to_batch`` without a connection, a unique key
    pushed twice (the holder's input read back on Django's connection, so the same id), and an empty batch
    whose continuation is inserted at once (its JSON read back there too); a rollback drops them all, and the
    same pushes committed are all there, read on the outbox's own engine."""
    from django.db import connections, transaction

    note = box.note

    def push_all() -> list[Any]:
        ids = [note.push("a"), note.push(connections["default"], "b"), box.push(note.s("c"))]
        ids.append(note.options(priority=7, delay=60).push("d"))
        ids += box.push_many([note.s(f"many {i}") for i in range(60)])
        batch = box.push_batch([note.s("member")])
        ids += [*batch.member_ids, *box.append_to_batch(batch.id, [note.s("appended")])]
        first = note.options(unique_key="once").push("same")
        assert note.options(unique_key="once").push("same") == first
        ids.append(first)
        empty = box.push_batch([], then=note.s())
        ids.append(empty.continuation_id)
        return ids

    with pytest.raises(Rollback), transaction.atomic():
        ids = push_all()
        assert rows_on_django(box) == len(ids) == 68
        raise Rollback
    assert rows_on_django(box) == 0
    with transaction.atomic():
        ids = push_all()
    assert box.count() == len(ids) == 68
    assert [box.get(i).input for i in ids[:4]] == [{"text": t} for t in "abcd"]
    assert box.get(ids[3]).priority == 7 and box.get(ids[-1]).input == {"text": []}


@pytest.mark.pg
def test_errors_are_raised_by_the_push_and_fail_the_atomic_block(box: Any) -> None:
    """Proves a push whose INSERT the database refuses (a CHECK constraint added for the test) raises at the push,
    not at the commit: inside ``atomic()`` the block is marked for rollback (Django then refuses its next query,
    as after a failed ORM query) and nothing is kept; outside ``atomic()`` nothing is kept either and Django's
    connection is usable at once."""
    from django.db import connection, transaction
    from django.db.transaction import TransactionManagementError

    table = f"{box.settings.table_prefix}commands"
    with box.engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {table} ADD CONSTRAINT refuse_forbidden CHECK (target <> 'forbidden')"))
    forbidden = box.note.options(target="forbidden")
    with transaction.atomic():
        box.note.push("before")
        with pytest.raises(sa.exc.IntegrityError, match="refuse_forbidden"):
            forbidden.push("refused")
        assert connection.needs_rollback
        with pytest.raises(TransactionManagementError):
            rows_on_django(box)
    assert box.count() == 0
    with pytest.raises(sa.exc.IntegrityError, match="refuse_forbidden"):
        forbidden.push("refused in autocommit")
    assert not connection.needs_rollback and rows_on_django(box) == 0


@pytest.mark.pg
def test_no_notice_handler_is_added_to_djangos_connection(box: Any) -> None:
    """Proves SQLAlchemy's psycopg on_connect hook is not run on Django's connection: five pushes leave its
    notice handlers as they were (SQLAlchemy's hook would add one per push to a connection that lives on)."""
    from django.db import connection

    connection.ensure_connection()
    raw = connection.connection
    before = list(raw._notice_handlers)
    for i in range(5):
        box.note.push(f"n{i}")
    assert connection.connection is raw and raw._notice_handlers == before


@pytest.mark.pg
def test_missing_tables_name_the_outbox_database(django_site: Site) -> None:
    """Proves the first push of an outbox whose tables were never made raises TablesMissing naming the database
    derived from Django's DATABASES and the command to run, and leaves Django's transaction usable."""
    from django.db import transaction

    outbox = DjangoOutbox(new_app(), table_prefix=integration_prefix())

    @outbox.command(target=unique_target("missing"))
    def lost(text: str) -> str:
        return text

    try:
        with transaction.atomic():
            with pytest.raises(TablesMissing, match=f"/{django_site.database} .*orch-outbox"):
                lost.push("x")
            assert django_site.order.objects.count() >= 0  # the block is not failed
    finally:
        outbox.close()
        outbox.engine.dispose()


@pytest.mark.pg
def test_settings_are_read_as_celerys_django_integration_reads_them(django_site: Site) -> None:
    """Proves a DjangoOutbox on an app configured with ``config_from_object("django.conf:settings",
    namespace="CELERY")`` reads CELERY_OUTBOX_* Django settings as its outbox_* settings; its database is
    CELERY_OUTBOX_DATABASE_URL when set, else Django's DATABASES["default"]; and that the project's outbox (the
    first DjangoOutbox made, proj/celery.py's) is the one the admin page and manage.py find."""
    from celery import Celery
    from django.test import override_settings

    with override_settings(CELERY_OUTBOX_TABLE_PREFIX="dj_", CELERY_OUTBOX_DEFAULT_RETRIES=7):
        app = Celery(f"dj-{uuid.uuid4().hex[:6]}", set_as_current=False)
        app.config_from_object("django.conf:settings", namespace="CELERY")
        derived = DjangoOutbox(app)
        assert (derived.settings.table_prefix, derived.settings.default_retries) == ("dj_", 7)
        assert derived.engine.url.database == django_site.database
        assert derived.engine.url.drivername == "postgresql+psycopg"
    with override_settings(CELERY_OUTBOX_DATABASE_URL="postgresql+psycopg://other@127.0.0.1:5432/elsewhere"):
        app = Celery(f"dj-{uuid.uuid4().hex[:6]}", set_as_current=False)
        app.config_from_object("django.conf:settings", namespace="CELERY")
        assert DjangoOutbox(app).engine.url.database == "elsewhere"
    assert find_outbox() is django_site.outbox
    assert find_outbox("proj.celery:outbox") is django_site.outbox
    with pytest.raises(ConfigurationError, match="not an Outbox"):
        find_outbox("proj.celery:app")
