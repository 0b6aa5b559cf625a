"""The claim's candidates under flow control: due rows in claim order, or tenants in turns.

Tenants take turns only while claims lately met commands with a tenant. A fair claim
visits the tenants with due rows (a skip scan of an index over pending rows with a
tenant, continuing after the tenant the last claim ended on) and reads a share of each
one's due rows, beside the rows without a tenant; ``flow.fair_order`` then orders them.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from ..flow import Candidate
from .base import StoreBase

#: Most tenants one claim visits (the next claim continues after the last one visited).
TENANTS_PER_CLAIM = 100
#: Seconds claims keep taking tenants in turns after one met a command with a tenant.
TENANTS_MEMORY = 60.0


class FairCandidates(StoreBase):
    """The candidates of a claim under flow control, and whether tenants take turns."""

    #: the tenant the last fair claim ended on (the next one starts after it)
    _fair_cursor: str = ""
    #: until this monotonic time, claims take tenants in turns (a claim lately saw commands with a tenant)
    _tenants_until: float = 0.0

    def tenants_lately(self) -> bool:
        """True while claims have lately met commands with a tenant (only then do tenants take turns)."""
        return time.monotonic() < self._tenants_until

    def saw_tenants(self) -> None:
        """A claim met commands with a tenant: the next claims, for a while, take tenants in turns."""
        self._tenants_until = time.monotonic() + TENANTS_MEMORY

    def _candidates(
        self, conn: sa.Connection, params: dict[str, Any], where: list[Any], limit: int, fair: bool
    ) -> list[Candidate]:
        """Due rows (``where``, with ``params``: those of the keys with room) in claim order, or (fair) those
        without a tenant and a share of each tenant visited."""
        t = self.table
        columns = (t.c.id, t.c.target, t.c.name, t.c.tenant, t.c.priority, t.c.scheduled_at)
        order = (t.c.priority.desc(), t.c.scheduled_at)
        if not fair:
            stmt = sa.select(*columns).where(*where).order_by(*order).limit(limit * 2)
            return [Candidate(*r) for r in conn.execute(stmt, params)]
        held = set(params["p_out_tenants"])
        tenants = [name for name in self._due_tenants(conn) if name not in held]
        plain = sa.select(*columns).where(*where, t.c.tenant.is_(None)).order_by(*order).limit(limit)
        found = [Candidate(*r) for r in conn.execute(plain, params)]
        if not tenants:
            return found
        self.saw_tenants()
        share = max(4, math.ceil(2 * limit / (len(tenants) + 1)))
        rows = self._tenant_rows(conn, columns, where, params, tenants, share)
        found.extend(rows)
        # A tenant that filled its share may have more; with few rows found, fetch deeper into those.
        each = Counter(r.tenant for r in rows)
        full = [name for name in tenants if each[name] >= share]
        if full and len(found) < 2 * limit and share < limit:
            deeper = min(limit, max(2 * share, math.ceil(2 * limit / len(full))))
            seen = {r.id for r in rows}
            more = self._tenant_rows(conn, columns, where, params, full, deeper)
            found.extend(r for r in more if r.id not in seen)
        return found

    def _tenant_rows(
        self,
        conn: sa.Connection,
        columns: tuple[Any, ...],
        where: list[Any],
        params: dict[str, Any],
        tenants: list[str],
        share: int,
    ) -> list[Candidate]:
        """Up to ``share`` due rows of each tenant, in claim order (a lateral join per tenant on PostgreSQL)."""
        t = self.table
        order = (t.c.priority.desc(), t.c.scheduled_at)
        if conn.dialect.name == "postgresql":  # the tenants as one array: one statement, compiled once
            visit = sa.func.unnest(sa.bindparam("p_visit", type_=postgresql.ARRAY(sa.String())))
            names = visit.table_valued("tenant").render_derived(name="visited")
            rows = (
                sa.select(*columns)
                .where(*where, t.c.tenant == names.c.tenant)
                .order_by(*order)
                .limit(share)
                .lateral("rows")
            )
            stmt = sa.select(*(rows.c[c.name] for c in columns)).select_from(names).join(rows, sa.true())
            params = {**params, "p_visit": tenants}
        else:
            turn = sa.func.row_number().over(partition_by=t.c.tenant, order_by=order).label("turn")
            ranked = sa.select(*columns, turn).where(*where, t.c.tenant.in_(tenants)).subquery()
            stmt = sa.select(*(ranked.c[c.name] for c in columns)).where(ranked.c.turn <= share)
        return [Candidate(*r) for r in conn.execute(stmt, params)]

    def _due_tenants(self, conn: sa.Connection) -> list[str]:
        """Tenants with pending rows after the one the last claim ended on (wrapping round), a claim's worth at most."""
        first = self._tenant_scan(conn, self._fair_cursor, TENANTS_PER_CLAIM)
        if len(first) < TENANTS_PER_CLAIM and self._fair_cursor:
            first += [n for n in self._tenant_scan(conn, "", TENANTS_PER_CLAIM - len(first)) if n not in first]
        self._fair_cursor = first[-1] if len(first) >= TENANTS_PER_CLAIM else ""
        return first

    def _tenant_scan(self, conn: sa.Connection, after: str, most: int) -> list[str]:
        """A skip scan of the due-by-tenant index: each step seeks the next tenant with a pending row."""
        table = self.table.name
        scope = "status = 'pending' AND kind IS NULL AND tenant IS NOT NULL"
        sql = sa.text(
            f"WITH RECURSIVE seen(tenant, n) AS ("
            f"SELECT (SELECT min(tenant) FROM {table} WHERE {scope} AND tenant > :after), 1 "
            f"UNION ALL SELECT (SELECT min(tenant) FROM {table} WHERE {scope} AND tenant > seen.tenant), n + 1 "
            f"FROM seen WHERE seen.tenant IS NOT NULL AND n < :most) "
            f"SELECT tenant FROM seen WHERE tenant IS NOT NULL"
        )
        return [r[0] for r in conn.execute(sql, {"after": after, "most": most})]
