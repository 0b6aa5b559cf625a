"""The shipped Alembic migrations produce exactly the declared metadata."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from orch_outbox import metadata_for, migrate
from orch_outbox.store import make_engine

from conftest import unique_prefix

pytestmark = pytest.mark.pg
ROOT = Path(__file__).resolve().parents[2]


def _shape(conn: sa.Connection, prefix: str) -> dict[str, object]:
    """Columns, indexes and constraints of one outbox table, with the prefix taken out."""
    table = f"{prefix}commands"
    columns = conn.execute(
        sa.text(
            "SELECT column_name, data_type, is_nullable, column_default, character_maximum_length "
            "FROM information_schema.columns WHERE table_name = :t ORDER BY ordinal_position"
        ),
        {"t": table},
    ).all()
    indexes = conn.execute(
        sa.text("SELECT indexdef FROM pg_indexes WHERE tablename = :t ORDER BY indexname"), {"t": table}
    ).all()
    constraints = conn.execute(
        sa.text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = CAST(:t AS regclass) ORDER BY conname"
        ),
        {"t": table},
    ).all()
    triggers = conn.execute(
        sa.text(
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE tgrelid = CAST(:t AS regclass) AND NOT tgisinternal ORDER BY tgname"
        ),
        {"t": table},
    ).all()
    assert triggers, "the NOTIFY trigger is missing"
    text = repr((columns, indexes, constraints, triggers))
    return {"shape": text.replace(prefix, "PREFIX_")}


def test_upgrade_matches_declared_metadata_on_postgresql(pg_engine: sa.Engine) -> None:
    """Proves migrations == metadata: a drift in either (a column, a type, a partial index) fails here."""
    migrated, declared = unique_prefix(), unique_prefix()
    try:
        with pg_engine.begin() as conn:
            migrate.upgrade(prefix=migrated, connection=conn)
            metadata_for(declared).create_all(conn)
        with pg_engine.connect() as conn:
            assert _shape(conn, migrated) == _shape(conn, declared)
            assert migrate.schema_diff(conn, migrated) == []
            assert migrate.current_revision(conn, migrated) == "0010"
    finally:
        with pg_engine.begin() as conn:
            metadata_for(declared).drop_all(conn)
            migrate.downgrade(prefix=migrated, connection=conn)
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {migrated}alembic_version"))


def test_downgrade_to_base_removes_the_table(pg_engine: sa.Engine) -> None:
    """Proves the downgrade path works, so an operator can back out a release."""
    prefix = unique_prefix()
    with pg_engine.begin() as conn:
        migrate.upgrade(prefix=prefix, connection=conn)
    with pg_engine.begin() as conn:
        migrate.downgrade(prefix=prefix, connection=conn)
        assert not sa.inspect(conn).has_table(f"{prefix}commands")
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {prefix}alembic_version"))


def test_upgrade_on_sqlite_matches_metadata(tmp_path: Path) -> None:
    """Proves the embedded default's database gets the same schema through the same migrations."""
    engine = make_engine(f"sqlite:///{tmp_path}/m.sqlite3")
    migrate.upgrade(str(engine.url), prefix="orch_")
    with engine.connect() as conn:
        assert migrate.schema_diff(conn, "orch_") == []
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("orch_commands")}
    assert {"orch_commands_due_idx", "orch_commands_lease_idx"} <= indexes
    engine.dispose()


def test_offline_sql_names_the_prefixed_table() -> None:
    """Proves `orch-outbox migrate --sql` output is usable by a DBA: prefixed DDL, partial index included."""
    sql = migrate.upgrade_sql("postgresql+psycopg://u@localhost/db", prefix="billing_")
    assert "CREATE TABLE billing_commands" in sql
    assert "CREATE INDEX billing_commands_due_idx" in sql and "WHERE status = 'pending'" in sql
    assert "billing_alembic_version" in sql


def test_wheel_ships_the_migrations(tmp_path: Path) -> None:
    """Proves an installed package (not only a source checkout) can migrate: the wheel carries them."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=120,
    )
    wheel = next(tmp_path.glob("orch_outbox-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "orch_outbox/migrations/env.py",
        "orch_outbox/migrations/script.py.mako",
        "orch_outbox/migrations/versions/0001_commands.py",
        "orch_outbox/py.typed",
    ):
        assert required in names


def test_plain_alembic_cli_from_the_checkout(pg_engine: sa.Engine) -> None:
    """Proves a user's own Alembic tooling can run our migrations: `alembic -x url=... -x prefix=... upgrade head`
    from the checkout's alembic.ini gives the declared schema, and downgrade removes it."""
    prefix = unique_prefix()
    alembic = [
        str(Path(sys.executable).with_name("alembic")),
        "-x",
        f"url={pg_engine.url.render_as_string(False)}",
        "-x",
        f"prefix={prefix}",
    ]
    try:
        subprocess.run([*alembic, "upgrade", "head"], cwd=ROOT, check=True, timeout=120)
        with pg_engine.connect() as conn:
            assert migrate.schema_diff(conn, prefix) == []
            assert migrate.current_revision(conn, prefix) == "0010"
        subprocess.run([*alembic, "downgrade", "base"], cwd=ROOT, check=True, timeout=120)
        with pg_engine.connect() as conn:
            assert not sa.inspect(conn).has_table(f"{prefix}commands")
    finally:
        with pg_engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {prefix}commands"))
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {prefix}alembic_version"))
