"""Pushing: rows written in the caller's transaction (INSERT, held pushes, COPY for bulk)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..canvas import Plan
from ..errors import OutboxError, UniqueConflict
from ..schema import (
    unique_scope,
)
from .base import (
    Row,
    StoreBase,
)
from .pending import PENDING, Statement, driver, raise_driver_error

#: Rows rendered per write of a COPY.
COPY_CHUNK_ROWS = 2_000


#: COPY text escapes: backslash first, then the separators.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


#: JSON for COPY text: ASCII only, so no raw tab or newline can reach the row.
_COPY_JSON = json.JSONEncoder(separators=(",", ":"))


def _insert_sql(template: str, table: str, columns: Sequence[str], raw: Any, numbered: bool = False) -> str:
    """``template`` (``COPY {} ({}) …`` or ``INSERT INTO {} ({}) VALUES ({})``) with the table and columns quoted;
    the values' placeholders psycopg's (``%s``), or libpq's (``$1``...) if ``numbered``."""
    from psycopg import sql

    parts = [sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))]
    if template.count("{}") == 3:
        count = len(columns)
        marks = [sql.SQL(f"${i}") for i in range(1, count + 1)] if numbered else [sql.Placeholder()] * count
        parts.append(sql.SQL(", ").join(marks))
    return str(sql.SQL(template).format(*parts).as_string(raw))


def _param(value: Any, json_column: bool) -> bytes | None:
    """A column's value as PostgreSQL's text input reads it (the server takes its type from the column)."""
    if value is None:
        return None
    return (_json_text(value) if json_column else _text(value)).encode()


def _json_text(value: Any) -> str:
    """JSON as text: the one an encoded input kept (``Arguments.text``), else dumped with ASCII escapes."""
    return getattr(value, "text", None) or _COPY_JSON.encode(value)


def _text(value: Any) -> str:
    """A value other than JSON as PostgreSQL's text input reads it (COPY escapes it further)."""
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)
    return str(value)


class _CopyText:
    """Rows as PostgreSQL COPY text: tab-separated, ``\\N`` for NULL, with COPY's escapes.

    Columns go in the order ``id``, ``input``, then the rest. Rows of one bulk push share
    everything but their id and input (name, target, timeout, times...), so the rest is
    rendered once per template row and reused. JSON is dumped with ASCII escapes, so it
    holds no raw tab or newline; its backslashes are doubled for COPY.
    """

    def __init__(self, columns: Iterable[str], json_columns: frozenset[str]) -> None:
        self.json_columns = json_columns
        self.rest = sorted(set(columns) - {"id", "input"})
        self.columns = ["id", "input", *self.rest]
        self._rest_of: dict[int, tuple[Row, str]] = {}
        self._rendered: dict[tuple[str, type, Any], str] = {}

    def line(self, template: Row, command_id: uuid.UUID, data: Any) -> str:
        """One row: ``template``'s values but for its id and input."""
        known = self._rest_of.get(id(template))
        if known is None or known[0] is not template:
            known = self._rest_of[id(template)] = (template, "\t".join([self.render(c, template) for c in self.rest]))
        # JSON escapes every control character, tab and newline included: only backslashes need doubling
        value = "\\N" if data is None else _json_text(data).replace("\\", "\\\\")
        return f"{command_id}\t{value}\t{known[1]}\n"

    def render(self, column: str, row: Row) -> str:
        """One column of ``row`` as COPY text; a value other than a time or JSON is rendered once per push."""
        value = row.get(column)
        if value is None:
            return "\\N"
        if column in self.json_columns:
            return _COPY_JSON.encode(value).replace("\\", "\\\\")
        if isinstance(value, datetime):
            return self._render(value)
        key = (column, type(value), value)  # the type too: True and 1 are equal keys
        try:
            known = self._rendered.get(key)
        except TypeError:  # an unhashable value: rendered each time
            return self._render(value)
        if known is None:
            known = self._rendered[key] = self._render(value)
        return known

    def _render(self, value: Any) -> str:
        return _text(value).translate(_COPY_ESCAPES)


@contextlib.contextmanager
def _savepoint(raw: Any) -> Iterator[None]:
    """A savepoint on the caller's psycopg connection, unseen by SQLAlchemy: an error inside rolls back to it."""
    raw.execute("SAVEPOINT orch_outbox_push")
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # a lost connection: the transaction is gone anyway
            raw.execute("ROLLBACK TO SAVEPOINT orch_outbox_push")
            raw.execute("RELEASE SAVEPOINT orch_outbox_push")
        raise
    raw.execute("RELEASE SAVEPOINT orch_outbox_push")


def _raw_psycopg(conn: sa.Connection) -> bool:
    """True when the caller's connection is a synchronous psycopg one (COPY and held pushes talk to it directly).

    Under asyncio (``AsyncSession``/``AsyncConnection``, seen here through ``run_sync``) rows go
    through SQLAlchemy's own INSERT, written at once.
    """
    return conn.dialect.driver == "psycopg" and not conn.dialect.is_async


#: From this many rows in one push, PostgreSQL gets them through COPY instead of INSERT.
COPY_MIN_ROWS = 50


class PushStatements(StoreBase):
    """Pushing: rows written in the caller's transaction (INSERT, held pushes, COPY for bulk)."""

    def insert(
        self, conn: sa.Connection, rows: Sequence[Row] | Plan, strict: bool = True, now: datetime | None = None
    ) -> list[uuid.UUID]:
        """Insert new command rows (and batches) on the caller's connection, inside the caller's transaction.

        On psycopg, fewer than ``COPY_MIN_ROWS`` plain rows are held and written with the
        transaction's next statement or its commit (:class:`_PendingPushes`); from that
        many, COPY writes at once. Returns each row's command id. A row with a ``unique_key`` that an unfinished
        command already holds is not inserted: its id is that command's (``strict``:
        only if name and input are the same, else :class:`UniqueConflict`).
        """
        if isinstance(rows, Plan):
            if rows.batches:
                now = now or self.now_for_insert()
                conn.execute(sa.insert(self.batches), [{**b, "created_at": now} for b in rows.batches])
            inserted = self.insert(conn, rows.rows, strict, now)
            members = {r.get("batch_id") for r in rows.rows}
            for batch in rows.batches:
                if batch["id"] not in members:  # an empty batch is finished at once
                    self._settle(conn, batch["id"])
            return inserted
        if not rows:
            return []
        stamped = self._stamp(rows, now)
        plain = [r for r in stamped if r.get("unique_key") is None]
        raw_ok = _raw_psycopg(conn)
        if len(plain) >= COPY_MIN_ROWS and raw_ok:
            self._copy(conn, plain)
        elif plain and raw_ok:
            PENDING.add(conn, plain, self)
        elif plain:  # one executemany per set of columns: rows of a chain step may lack some keys
            for _, group in itertools.groupby(plain, key=lambda r: tuple(sorted(r))):
                conn.execute(sa.insert(self.table), list(group))
        ids: list[uuid.UUID] = [r["id"] for r in stamped]
        for i, row in enumerate(stamped):
            if row.get("unique_key") is not None:
                ids[i] = self._insert_unique(conn, row, strict)
        return ids

    def insert_templated(
        self, conn: sa.Connection, items: Iterable[tuple[Row, uuid.UUID, Any]], count: int, templates: Sequence[Row]
    ) -> list[uuid.UUID]:
        """A bulk push given as ``count`` (template row, id, input): rows equal to their template but for id and input.

        ``templates``: the distinct template rows. From ``COPY_MIN_ROWS`` on PostgreSQL the
        rows go through COPY without being built one by one: each template is stamped and
        rendered once. Beyond one COPY chunk, the items are taken (and checked, see
        ``Outbox._templated_rows``) while the COPY writes, inside a savepoint that undoes
        the rows written if one is refused. Otherwise (and for rows with a unique key) this
        is :meth:`insert`.
        """
        if (
            count < COPY_MIN_ROWS
            or not _raw_psycopg(conn)
            or any(template.get("unique_key") is not None for template in templates)
        ):
            return self.insert(conn, [{**template, "id": cid, "input": data} for template, cid, data in items])
        now = self.now_for_insert()
        stamped = {
            id(template): row for template, row in zip(templates, self._stamp(templates, now, count), strict=True)
        }
        ids: list[uuid.UUID] = []

        def rows() -> Iterator[tuple[Row, uuid.UUID, Any]]:
            for template, cid, data in items:
                ids.append(cid)
                yield stamped[id(template)], cid, data

        columns = {c for stamp in stamped.values() for c in stamp}
        streamed = count > COPY_CHUNK_ROWS
        self._copy_lines(conn, columns, rows() if streamed else list(rows()), undo_on_error=streamed)
        return ids

    def _copy(self, conn: sa.Connection, rows: Sequence[Row]) -> None:
        """Many rows at once with PostgreSQL's COPY (rows of any shape)."""
        self._copy_lines(conn, {c for row in rows for c in row}, [(row, row["id"], row.get("input")) for row in rows])

    def _copy_lines(
        self,
        conn: sa.Connection,
        columns: set[str],
        rows: Iterable[tuple[Row, uuid.UUID, Any]],
        undo_on_error: bool = False,
    ) -> None:
        """COPY rows given as (row to take the other columns from, id, input), on the caller's transaction.

        Much cheaper per row than an INSERT; COPY fires the statement-level insert
        trigger too, so the relay is notified on commit as for an INSERT. The rows are
        rendered and sent a chunk at a time, so PostgreSQL stores one chunk while the
        next is made. ``undo_on_error``: inside a savepoint, so that an error while the
        rows are made (bad input) undoes what was written and leaves the transaction usable.
        """
        PENDING.flush(conn)  # earlier pushes of this transaction go first, as they were made
        text = _CopyText(columns, self._json_columns)
        raw = driver(conn)
        statement = _insert_sql("COPY {} ({}) FROM STDIN", self.table.name, text.columns, raw)
        line = text.line
        rest = iter(rows)
        try:
            undo = _savepoint(raw) if undo_on_error else contextlib.nullcontext()
            with undo, raw.cursor() as cursor, cursor.copy(statement) as copy:
                while chunk := list(itertools.islice(rest, COPY_CHUNK_ROWS)):
                    copy.write("".join([line(*row) for row in chunk]))
        except Exception as exc:
            raise_driver_error(exc, statement)

    def write_held(self, conn: sa.Connection, rows: Sequence[Row]) -> None:
        """Rows on the caller's psycopg connection, in the caller's transaction: prepared INSERTs, one round trip.

        The pushes of a transaction, written when it runs its next statement, or at its
        commit when they cannot go with it (see pending.py and :meth:`held_statements`).
        SQLAlchemy's execution layer would cost the caller more than the INSERT itself; the
        statement is built once per column set, and several rows of one set go as one
        pipelined ``executemany``.
        """
        from psycopg.types.json import Jsonb

        raw = driver(conn)
        statement = ""
        shapes: dict[tuple[str, ...], list[Row]] = {}
        for row in rows:
            shapes.setdefault(tuple(sorted(row)), []).append(row)
        json_columns = self._json_columns
        try:
            for columns, same in shapes.items():
                if len(same) >= COPY_MIN_ROWS:
                    self._copy_lines(conn, set(columns), [(row, row["id"], row.get("input")) for row in same])
                    continue
                known = self._insert_sql.get(columns)
                if known is None:
                    known = _insert_sql("INSERT INTO {} ({}) VALUES ({})", self.table.name, columns, raw)
                    if len(self._insert_sql) < 64:
                        self._insert_sql[columns] = known
                statement = known
                values = [
                    [Jsonb(row[c]) if row[c] is not None and c in json_columns else row[c] for c in columns]
                    for row in same
                ]
                with raw.cursor() as cursor:
                    if len(values) == 1:
                        cursor.execute(statement, values[0], prepare=True)
                    else:
                        cursor.executemany(statement, values)
        except Exception as exc:
            raise_driver_error(exc, statement)

    def held_statements(self, raw: Any, rows: Sequence[Row]) -> list[Statement] | None:
        """Held rows as INSERTs with their values as text, to go in one pipeline with the commit (see pending.py);
        None from ``COPY_MIN_ROWS`` rows (written before the commit instead, by COPY where enough share columns)."""
        if len(rows) >= COPY_MIN_ROWS:
            return None
        shapes: dict[tuple[str, ...], list[Row]] = {}
        for row in rows:
            shapes.setdefault(tuple(sorted(row)), []).append(row)
        json_columns = self._json_columns
        statements: list[Statement] = []
        for columns, same in shapes.items():
            key = ("$", *columns)
            known = self._insert_sql.get(key)
            if known is None:
                known = _insert_sql("INSERT INTO {} ({}) VALUES ({})", self.table.name, columns, raw, numbered=True)
                if len(self._insert_sql) < 64:
                    self._insert_sql[key] = known
            sql = known.encode()
            statements.extend((sql, [_param(row[c], c in json_columns) for c in columns]) for row in same)
        return statements

    @functools.cached_property
    def _json_columns(self) -> frozenset[str]:
        return frozenset(c.name for c in self.table.c if isinstance(c.type, sa.JSON))

    def _insert_unique(self, conn: sa.Connection, row: Row, strict: bool) -> uuid.UUID:
        """INSERT ... ON CONFLICT DO NOTHING on the partial unique index, else the holder's id.

        On PostgreSQL a concurrent, uncommitted push of the same key makes this statement
        wait for that transaction: if it commits, its command is returned; if it rolls
        back, this row is inserted. A holder that finishes in between frees the key, so
        the insert is tried again (bounded).
        """
        t = self.table
        dialect = conn.dialect.name
        dialect_insert: Any
        if dialect == "postgresql":
            dialect_insert = postgresql.insert
        elif dialect == "sqlite":
            dialect_insert = sqlite.insert
        else:  # pragma: no cover - the outbox supports PostgreSQL and SQLite
            raise OutboxError(f"unique keys are not supported on {dialect}")
        stmt = (
            dialect_insert(t)
            .values(**row)
            .on_conflict_do_nothing(index_elements=[t.c.unique_key], index_where=unique_scope(t))
            .returning(t.c.id)
        )
        holder_query = sa.select(t.c.id, t.c.name, t.c.input).where(
            t.c.unique_key == row["unique_key"], unique_scope(t)
        )
        for _ in range(5):
            inserted = conn.execute(stmt).scalar_one_or_none()
            if inserted is not None:
                return uuid.UUID(str(inserted))
            holder = conn.execute(holder_query).first()
            if holder is None:
                continue  # the holder finished between the two statements: the key is free again
            if strict and (holder.name != row["name"] or holder.input != row["input"]):
                raise UniqueConflict(
                    f"unique key {row['unique_key']!r} is held by unfinished command {holder.id} "
                    f"({holder.name}) with a different input"
                )
            return uuid.UUID(str(holder.id))
        raise UniqueConflict(f"unique key {row['unique_key']!r}: its holder kept changing; try again")
