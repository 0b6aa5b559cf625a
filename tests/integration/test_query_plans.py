"""The hot statements keep their indexes when the table's statistics are stale.

A fresh or fast-growing outbox table has not been analysed yet. Before migration 0005 the
planner then served the fenced ``WHERE id = ? AND status = 'dispatched'`` of every start
with the ``(status, target)`` index and walked every dispatched row for each command;
these tests fail if any index again offers ``status`` as a way in over the fence.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from orch_outbox import Outbox
from orch_outbox.store.hotpath import Prepared
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


def _prepared_plans(outbox: Outbox, statement: Prepared, given: dict[str, Any]) -> list[str]:
    """The plans of a hot-path statement as the worker runs it (prepared, through libpq): the custom plan for these
    values, and the generic plan PostgreSQL switches a prepared statement to after five runs."""
    values = statement.values(given)
    raw = outbox.store.engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        conn.autocommit = True
        pgconn = conn.pgconn
        custom = pgconn.exec_params(b"EXPLAIN " + statement.sql, values, statement.types)
        assert pgconn.prepare(b"plan_check", statement.sql, statement.types).error_message == b""
        conn.execute("SET plan_cache_mode = force_generic_plan")
        literals = ", ".join("NULL" if v is None else "'" + v.decode().replace("'", "''") + "'" for v in values)
        generic = pgconn.exec_(f"EXPLAIN EXECUTE plan_check({literals})".encode())
        conn.execute("DEALLOCATE plan_check")
        conn.execute("RESET plan_cache_mode")
    finally:
        raw.close()
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


@SIZES
def test_fenced_complete_uses_the_primary_key_with_stale_statistics(
    make_outbox: Callable[..., Outbox], rows: int
) -> None:
    """Proves recording an outcome costs one primary-key probe, not a walk over every running row (the plans a
    prepared statement uses, as for the start)."""
    outbox = make_outbox()
    ids = _fill(outbox, "running", rows=rows)
    given = {"p_id": ids[rows // 2], "p_attempt": 1, "p_output": "null"}
    for plan in _plans_to_check(_prepared_plans(outbox, outbox.store._hot_complete, given), rows):
        assert f"Index Scan using {outbox.store.table.name}_pkey" in plan, plan


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
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(f"ANALYZE {store.table.name}")
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
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(f"ANALYZE {store.table.name}")
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
