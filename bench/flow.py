"""Section ``flow``: the cost of a claim under flow control, beside the plain claim, on 10 000 due rows.

Each outbox gets 10 000 due rows; one claim of a relay batch (200 rows) is timed, its rows
handed back to pending (``Store.undispatch``), and again, ``CLAIMS`` times after a warm-up,
the outboxes taking turns claim by claim; the median is reported. Side by side:

- the plain claim (no limits, no tenants): the one statement the relay runs by default;
- limits configured (a target concurrency, a target rate and a command concurrency, none of
  them reached): the flow claim, under its advisory lock;
- the rows spread over 50 tenants, taking turns (no limits);
- 50 tenants with a `tenant:*` concurrency limit and turns.

The target: the claim with limits within 1.5x the claim without.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench import common
from bench.common import Run, Section, Sizes, Target
from orch_outbox import Outbox

ROWS = 10_000
CLAIMS = 40
BATCH = 200


def outbox_with(run: Run, name: str, **settings: Any) -> Outbox:
    from celery import Celery

    app = Celery(f"bench-flow-{name}", set_as_current=False, broker="memory://")  # no broker used
    outbox = Outbox(app, common.DB_URL, table_prefix=run.prefix(f"fl{name}"), **settings)

    @outbox.command(name="flow_noop", retries=0)
    def flow_noop(i: int) -> int:
        return i

    outbox.create_tables()
    return outbox


def fill(outbox: Outbox, tenants: int) -> None:
    cmd = outbox.task("flow_noop")
    for start in range(0, ROWS, 5_000):
        calls = [
            cmd.s(i).set(target="flow-q", tenant=f"t{i % tenants:03d}" if tenants else None)
            for i in range(start, start + 5_000)
        ]
        with outbox.engine.begin() as conn:
            outbox.push_many(conn, calls)
    common.pg_exec(f"ANALYZE {outbox.store.table.name}")


def claim_once(outbox: Outbox) -> float:
    """Milliseconds of one claim of BATCH rows (the batch handed back to pending after)."""
    s = outbox.settings
    plan = outbox.relay.plan()
    t0 = time.perf_counter()
    batch = outbox.store.claim(BATCH, s.dispatch_timeout, s.max_in_flight, plan=plan)
    elapsed = time.perf_counter() - t0
    if len(batch) != BATCH:
        raise common.BenchError(f"a claim took {len(batch)} rows, expected {BATCH}")
    outbox.store.undispatch(batch)
    return elapsed * 1000


def claims_ms(outboxes: dict[str, Outbox]) -> dict[str, float]:
    """Median milliseconds of one claim per outbox, the outboxes taking turns claim by claim.

    Taking turns, every scenario meets the same moments of the machine (a 2-core machine
    shared with its servers drifts by 50 % or more between one run and the next), so the
    ratios compare like with like.
    """
    times: dict[str, list[float]] = {name: [] for name in outboxes}
    for i in range(CLAIMS + 3):
        for name, outbox in outboxes.items():
            elapsed = claim_once(outbox)
            if i >= 3:
                times[name].append(elapsed)
    return {name: statistics.median(spent) for name, spent in times.items()}


def run_section(run: Run, sizes: Sizes, section: Section) -> None:
    limits = {
        "flow-q": {"concurrency": 100_000, "rate": "1000000/s"},
        "command:flow_noop": {"concurrency": 100_000},
    }
    scenarios = {
        "plain": ({}, 0),
        "limits": ({"limits": limits}, 0),
        "tenants": ({}, 50),
        "tenant_limits": ({"limits": {"tenant:*": {"concurrency": 10_000}}}, 50),
    }
    outboxes: dict[str, Outbox] = {}
    try:
        for name, (settings, tenants) in scenarios.items():
            outboxes[name] = outbox_with(run, name, **settings)
            fill(outboxes[name], tenants)
        figures = claims_ms(outboxes)
    finally:
        for outbox in outboxes.values():
            common.drop_outbox(outbox)
    section.setup.update(rows=ROWS, batch=BATCH, claims=f"{CLAIMS}, median, the scenarios in turns", tenants=50)
    plain = figures["plain"]
    section.metrics += [
        common.Metric("claim, no limits, no tenants", plain, None, "ms"),
        common.Metric(
            "claim with limits (target, rate, command)",
            figures["limits"],
            plain,
            "ms",
            "plain claim",
            Target("ratio_max", 1.5, "≤ 1.5x"),
        ),
        common.Metric("claim, 50 tenants in turns", figures["tenants"], plain, "ms", "plain claim"),
        common.Metric("claim, 50 tenants, tenant:* limit", figures["tenant_limits"], plain, "ms", "plain claim"),
    ]
    section.notes.append(
        "the flow claim: an advisory lock, the in-flight counts of limited keys, the rate buckets, a skip scan of the "
        "tenants with due rows and a few rows of each, then one UPDATE of the rows admitted"
    )
