"""The hot statements keep their indexes when the table's statistics are stale.

A fresh or fast-growing outbox table has not been analysed yet. Before migration 0005 the
planner then served the fenced ``WHERE id = ? AND status = 'dispatched'`` of every start
with the ``(status, target)`` index and walked every dispatched row for each command;
these tests fail if any index again offers ``status`` as a way in over the fence.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox
from orch_outbox.store.base import BY_KEY_ONLY
from orch_outbox.store.hotpath import Prepared
from orch_outbox.store.starts import START_LANE
from orch_outbox.uuid7 import uuid7

pytestmark = pytest.mark.pg

ROWS = 3000


def _fill(outbox: Outbox, status: str, analysed_before: bool = False, rows: int = ROWS) -> list[Any]:
    """``rows`` rows in ``status``, attempt 1, written in one statement and never analysed (``analysed_before``: the
    table was analysed before, so its statistics know other rows, not these)."""
    store = outbox.store
    t = store.table
    now = store.now()
    ids = [uuid7() for _ in range(rows)]
    values = [
        {
            "id": command_id,
            "name": "noop",
            "target": "q",
            "status": status,
            "attempt": 1,
            "input": {},
            "timeout": 60,
            "retries": 0,
            "retries_left": 0,
            "priority": 0,
            "scheduled_at": now,
            "created_at": now,
        }
        for command_id in ids
    ]
    with store.engine.begin() as conn:
        conn.execute(sa.insert(t), values)
        analysed = conn.execute(
            sa.text("SELECT reltuples FROM pg_class WHERE relname = :t"), {"t": t.name}
        ).scalar_one()
    assert analysed_before or analysed <= 0, "the table was analysed: the test needs stale statistics"
    return ids


def _plan(outbox: Outbox, sql: str, params: dict[str, Any]) -> str:
    raw = outbox.store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        raw.rollback()
    finally:
        raw.close()
    return plan


def _literals(values: list[bytes | None]) -> str:
    """A prepared statement's values as SQL literals, for ``EXECUTE``."""
    return ", ".join("NULL" if v is None else "'" + v.decode().replace("'", "''") + "'" for v in values)


def _prepared_plans(outbox: Outbox, statement: Prepared, given: dict[str, Any], setup: str = "") -> list[str]:
    """The plans of a hot-path statement as the worker runs it (prepared, through libpq, on the hot path's own
    connection and its session settings, after ``setup`` in its transaction): the custom plan for these values,
    and the generic plan PostgreSQL switches a prepared statement to after five runs."""
    values = statement.values(given)
    assert outbox.store._hot is not None
    pgconn = outbox.store._hot._held(False).cursor.connection.pgconn
    assert pgconn.prepare(b"plan_check", statement.sql, statement.types).error_message == b""
    pgconn.exec_(b"BEGIN")
    try:
        if setup:
            pgconn.exec_(setup.encode())
        custom = pgconn.exec_params(b"EXPLAIN " + statement.sql, values, statement.types)
        pgconn.exec_(b"SET LOCAL plan_cache_mode = force_generic_plan")
        generic = pgconn.exec_(f"EXPLAIN EXECUTE plan_check({_literals(values)})".encode())
    finally:
        pgconn.exec_(b"ROLLBACK")
        pgconn.exec_(b"DEALLOCATE plan_check")
    plans = []
    for result in (custom, generic):
        assert result.error_message == b"", result.error_message
        plans.append("\n".join(result.get_value(i, 0).decode() for i in range(result.ntuples)))
    return plans


#: A fresh outbox (the generic plan is made once, while the table is this small, and then kept) and a grown one.
SIZES = pytest.mark.parametrize("rows", [40, ROWS], ids=["fresh", "grown"])


def _plans_to_check(plans: list[str], rows: int) -> list[str]:
    """Both plans of a grown table; of a fresh one the generic plan only (a custom plan is made again at every run,
    so it follows the table as it grows, and over 40 rows any index does)."""
    return plans if rows == ROWS else plans[1:]


@SIZES
def test_fenced_start_uses_the_primary_key_with_stale_statistics(make_outbox: Callable[..., Outbox], rows: int) -> None:
    """Proves a worker's start costs one primary-key probe, not a walk over every dispatched row, in the plans a
    prepared statement uses. The statuses of the fence are parameters: written into the SQL, they let the generic
    plan made on a fresh table walk the partial index of unfinished rows instead (0.7 ms a start against 0.1 ms
    once 10 000 commands were queued)."""
    outbox = make_outbox()
    ids = _fill(outbox, "dispatched", rows=rows)
    given = {
        "p_id": ids[rows // 2],
        "p_attempt": 1,
        "p_name": "noop",
        "p_worker": "w",
        "p_lease": timedelta(seconds=60),
    }
    for plan in _plans_to_check(_prepared_plans(outbox, outbox.store._hot_start, given), rows):
        assert f"Index Scan using {outbox.store.table.name}_pkey" in plan, plan
        assert f"Seq Scan on {outbox.store.table.name} " not in plan, plan


def _analyse(outbox: Outbox) -> None:
    with outbox.store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(f"ANALYZE {outbox.store.table.name}")


def _done(ids: list[Any]) -> dict[str, str]:
    """The values of the batched write-back's statement recording successes (output ``null``) of ``ids``."""
    done = ",".join(f'{{"id": "{i}", "attempt": 1, "output": null}}' for i in ids)
    return {"p_ids": "{" + ",".join(map(str, ids)) + "}", "p_done": f"[{done}]"}


def _wanted(ids: list[Any]) -> dict[str, str]:
    """The values of the grouped starts' statement starting attempt 1 of ``ids``."""
    wanted = ",".join(f'{{"id": "{i}", "attempt": 1, "name": "noop", "worker": "w", "lease": "60 s"}}' for i in ids)
    return {"p_ids": "{" + ",".join(map(str, ids)) + "}", "p_wanted": f"[{wanted}]"}


@pytest.mark.parametrize("statement", ["complete_many", "start_many"])
@pytest.mark.parametrize(("rows", "analysed"), [(40, False), (ROWS, False), (ROWS, True)])
def test_statements_over_many_rows_reach_them_by_the_primary_key(
    make_outbox: Callable[..., Outbox], rows: int, analysed: bool, statement: str
) -> None:
    """Proves recording a batch of successes, and starting a group of attempts, costs a primary-key probe per row,
    never a walk over the table, whatever its statistics: fresh, grown and never analysed, analysed. Each statement
    joins a JSON document that PostgreSQL estimates at 100 rows; planned as it comes, that was a hash join over a
    sequential scan of every row on the first two (and on analysed tables of up to tens of thousands of rows), and
    a custom plan of the fresh table walked the partial index of unfinished rows. Run after ``BY_KEY_ONLY``, as
    the worker runs them, each has one plan for any values (generic), through the primary key."""
    outbox = make_outbox()
    store = outbox.store
    ids = _fill(outbox, "running" if statement == "complete_many" else "dispatched", rows=rows)
    if analysed:
        _analyse(outbox)
    some = ids[rows // 2 : rows // 2 + 10]
    hot, given = (
        (store._hot_complete_many, _done(some))
        if statement == "complete_many"
        else (store._hot_start_many, _wanted(some))
    )
    [_, plan] = _prepared_plans(outbox, hot, given, BY_KEY_ONLY)  # only ever generic
    assert f"{store.table.name}_pkey" in plan and "Index Cond: (id = ANY ($" in plan, plan
    assert f"Seq Scan on {store.table.name} " not in plan, plan


#: Rows in the table when it was last analysed, in a quiet outbox (autovacuum analyses a small table as well).
QUIET_ROWS = 3
#: Runs of a prepared statement after which PostgreSQL keeps its generic plan (the sixth decides), and one more.
RUNS = 7


def _hot_conn(outbox: Outbox, key: tuple[Any, bool]) -> Any:
    """The hot path's connection kept under ``key`` (a lane or a thread, and whether it is relaxed)."""
    hot = outbox.store._hot
    assert hot is not None
    return hot._conns[key].cursor.connection


def _plan_in_use(conn: Any, statement: Prepared, given: dict[str, Any], setup: str = "") -> str:
    """The plan the statement prepared on ``conn`` runs with now, after ``setup`` in its transaction as the worker
    sends it (``EXPLAIN EXECUTE`` plans as a run would)."""
    literals = _literals(statement.values(given))
    conn.pgconn.exec_(b"BEGIN")
    try:
        if setup:
            conn.pgconn.exec_(setup.encode())
        result = conn.pgconn.exec_(b"EXPLAIN EXECUTE " + statement.name + f"({literals})".encode())
    finally:
        conn.pgconn.exec_(b"ROLLBACK")
    assert result.error_message == b"", result.error_message
    return "\n".join(result.get_value(i, 0).decode() for i in range(result.ntuples))


def _replan_now(outbox: Outbox) -> None:
    """As if ``REPLAN_SECONDS`` had passed for every hot-path connection."""
    assert outbox.store._hot is not None
    for held in outbox.store._hot._conns.values():
        held.replan_at = 0.0


@pytest.mark.parametrize("statement", ["start", "complete"])
def test_a_burst_after_a_quiet_spell_gets_index_plans(make_outbox: Callable[..., Outbox], statement: str) -> None:
    """Proves the worker's prepared start and outcome reach their row by the primary key once a burst of commands
    arrived after the table was analysed while it held a few rows. PostgreSQL keeps a prepared statement's generic
    plan until the table is analysed again; planned on those statistics it was a sequential scan, kept while
    200 000 rows arrived (every start then read the whole table, 30 ms instead of 0.1 ms). The hot path prepares its
    statements again every ``REPLAN_SECONDS``, planned on the table's size then."""
    outbox = make_outbox()
    store = outbox.store
    status = "dispatched" if statement == "start" else "running"
    quiet = _fill(outbox, status, rows=QUIET_ROWS + 2 * RUNS)
    _analyse(outbox)

    def run(ids: list[Any]) -> None:
        for command_id in ids:
            if statement == "start":
                assert store.start(command_id, 1, "noop", "w", 60.0) is not None
            else:
                assert store.complete_many([(command_id, 1, None)]) == {command_id}

    run(quiet[:RUNS])  # the generic plan, made on the quiet table's statistics, is in use from here on
    _fill(outbox, "completed", analysed_before=True, rows=20_000)  # the burst (finished: only the size matters)
    _replan_now(outbox)
    run(quiet[RUNS : 2 * RUNS])
    if statement == "start":
        key: tuple[Any, bool] = (START_LANE, store._relaxed is not None)
        given = {"p_id": quiet[-1], "p_attempt": 1, "p_name": "noop", "p_worker": "w", "p_lease": timedelta(seconds=60)}
        plan = _plan_in_use(_hot_conn(outbox, key), store._hot_start, given)
    else:
        key = (threading.get_ident(), False)
        plan = _plan_in_use(_hot_conn(outbox, key), store._hot_complete_many, _done(quiet[-1:]), BY_KEY_ONLY)
        assert "= ANY ($" in plan, plan  # the generic plan the batches run with, made after the burst
    assert f"{store.table.name}_pkey" in plan, plan
    assert f"Seq Scan on {store.table.name} " not in plan, plan


def test_the_claim_is_planned_at_each_run(make_outbox: Callable[..., Outbox]) -> None:
    """Proves the relay's claim keeps no prepared statement (so no generic plan): its statuses are parameters, so a
    generic plan cannot use the partial index of due rows; PostgreSQL kept one anyway when it first saw the table
    small (a scan of the whole table), and kept it as the table grew."""
    outbox = make_outbox()
    store = outbox.store
    _fill(outbox, "pending", rows=QUIET_ROWS)
    _analyse(outbox)
    for _ in range(RUNS):
        store.claim(2, 10.0)
    conn = _hot_conn(outbox, (threading.get_ident(), store._relaxed is not None))
    kept = conn.execute("SELECT statement FROM pg_prepared_statements WHERE statement LIKE '%SKIP LOCKED%'").fetchall()
    assert kept == [], kept


def _claim_plan(outbox: Outbox, capped: bool) -> str:
    """The plan of the relay's claim of 100 rows (``capped``: under an in-flight cap of 10)."""
    store = outbox.store
    sql, constants = store._hot_claim_capped if capped else store._hot_claim
    params = {**constants, "p_limit": 100, "p_lease": timedelta(seconds=10)}
    if capped:
        params["p_cap"] = 10
    return _plan(outbox, sql, params)


@pytest.mark.parametrize("capped", [False, True], ids=["no-cap", "max-in-flight"])
def test_claim_stays_on_the_due_index_with_stale_statistics(make_outbox: Callable[..., Outbox], capped: bool) -> None:
    """Proves the relay's claim reads the partial index of pending rows in claim order, not the whole table."""
    outbox = make_outbox()
    _fill(outbox, "pending")
    store = outbox.store
    plan = _claim_plan(outbox, capped)
    assert f"{store.table.name}_due_idx" in plan, plan


@pytest.mark.parametrize("capped", [False, True], ids=["no-cap", "max-in-flight"])
def test_claim_finds_the_rows_it_locked_by_address_when_statistics_lag(
    make_outbox: Callable[..., Outbox], capped: bool
) -> None:
    """Proves the claim's UPDATE reaches each locked row directly (a TID scan), with statistics taken when the table
    held only finished rows: found by id instead, the planner walked every pending row for each locked one (48 ms
    a claim with 2 000 pending among 1 M finished rows, against 2 ms)."""
    outbox = make_outbox()
    store = outbox.store
    _fill(outbox, "completed")
    _analyse(outbox)
    _fill(outbox, "pending", analysed_before=True)
    plan = _claim_plan(outbox, capped)
    assert f"Tid Scan on {store.table.name}" in plan, plan


@pytest.mark.parametrize("claim", ["plain", "max-in-flight", "flow"])
def test_claim_finds_the_rows_it_locked_by_address_on_a_freshly_analysed_table(
    make_outbox: Callable[..., Outbox], claim: str
) -> None:
    """Proves the claim's UPDATE reaches each locked row directly (a TID scan) on a small, freshly analysed table of
    pending rows, where joining the locked rows to the table by address let the planner prefer reading the whole
    table into a hash (4 ms of a 7 ms claim of 200 among 10 000 rows)."""
    outbox = make_outbox()
    store = outbox.store
    _fill(outbox, "pending", rows=10_000)
    _analyse(outbox)
    if claim == "flow":
        sql, constants = store._hot_flow_claim
        extra: dict[str, Any] = {"p_out_targets": ["held"], "p_out_commands": [], "p_out_tenants": []}
    else:
        sql, constants = store._hot_claim_capped if claim == "max-in-flight" else store._hot_claim
        extra = {"p_cap": 1000} if claim == "max-in-flight" else {}
    plan = _plan(outbox, sql, {**constants, **extra, "p_limit": 200, "p_lease": timedelta(seconds=10)})
    assert f"Tid Scan on {store.table.name}" in plan, plan
    assert f"Seq Scan on {store.table.name}" not in plan, plan


def test_a_completed_row_leaves_every_index_but_the_key_and_finished_at(
    make_outbox: Callable[..., Outbox],
) -> None:
    """Proves the lean schema: the indexes over completed rows are the primary key and retention's only."""
    outbox = make_outbox()
    t = outbox.store.table.name
    with outbox.store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t"), {"t": t}).all()
    over_completed = sorted(
        name.removeprefix(t) for name, definition in rows if " WHERE " not in definition or "completed" in definition
    )
    assert over_completed == ["_finished_idx", "_pkey"], rows
