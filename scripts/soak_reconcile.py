"""The soak's reconcile: the outbox table against what was pushed and against the effects ledger.

Imported by ``scripts/soak.py`` (which puts the repository root on ``sys.path`` first, for ``tests.support``).
"""

from __future__ import annotations

import argparse
import json
import re
import types
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from tests.support.procs import Proc
from tests.support.project import FINAL

#: Offending commands shown in detail (row, effects, log lines) when the reconcile fails.
SHOW_OFFENDERS = 8
LOG_LINES_PER_OFFENDER = 30


def table(prefix: str, name: str) -> str:
    """A table of the soak's (the prefix is a plain identifier: a-z, 0-9, _)."""
    return f"{prefix}{name}"


@dataclass
class Pushed:
    committed: list[uuid.UUID] = field(default_factory=list)
    rolled_back: list[uuid.UUID] = field(default_factory=list)
    with_fail: int = 0
    seconds: float = 0.0


@dataclass
class Reconciled:
    """The reconcile's findings; ``lines`` is the printed report."""

    lost: int
    double: int
    ghosts: int
    lines: list[str]
    offenders: dict[str, list[uuid.UUID]]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.double == 0 and self.ghosts == 0


def reconcile(
    engine: sa.Engine, prefix: str, pushed: Pushed, commands: types.ModuleType, args: argparse.Namespace
) -> Reconciled:
    """Compare the outbox with what was pushed and with the effects ledger."""
    raises = commands.raises
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.exec_driver_sql(
                "SELECT id, name, status, outcome, attempt, retries_left, parent_id, error_type, "
                f"(input->>'n')::int AS n, coalesce((input->>'fail')::boolean, false) AS fail "
                f"FROM {table(prefix, 'commands')}"
            )
        }
        effects = {
            (r[0], r[1]): (r[2], int(r[3]))
            for r in conn.exec_driver_sql(
                f"SELECT command_id, attempt, min(name), count(*) FROM {table(prefix, 'effects')} GROUP BY 1, 2"
            )
        }
    committed, rolled_back = set(pushed.committed), set(pushed.rolled_back)
    offenders: dict[str, list[uuid.UUID]] = {}

    def note(kind: str, ids: Iterable[uuid.UUID]) -> int:
        found = sorted(set(ids))
        if found:
            offenders[kind] = found
        return len(found)

    # 1. pushed commands present, rolled-back ones absent, every row final
    missing = note("missing", committed - rows.keys())
    ghosts = note("rolled-back but present", rolled_back & rows.keys())
    not_final = note("not final", (i for i, r in rows.items() if r.status not in FINAL))
    works = [r for r in rows.values() if r.name == "work"]

    def expected_row(i: uuid.UUID, r: Any) -> bool:
        if r.name == "work":
            return r.parent_id is None and i in committed
        return r.name in ("after_work", "after_failure") and r.parent_id in committed

    strays = note("unexpected rows", (i for i, r in rows.items() if not expected_row(i, r)))

    # 2. chained children: one after_work per completed work, one after_failure per failed work, none else
    children: Counter[tuple[uuid.UUID, str]] = Counter(
        (r.parent_id, r.name) for r in rows.values() if r.parent_id is not None
    )
    expected = {"completed": "after_work", "failed": "after_failure"}
    missing_child, extra_child, wrong_child = [], [], []
    for w in works:
        want = expected.get(w.status)
        for kind in ("after_work", "after_failure"):
            have = children[(w.id, kind)]
            if kind == want and have == 0:
                missing_child.append(w.id)
            elif kind == want and have > 1:
                extra_child.append(w.id)
            elif kind != want and have:
                wrong_child.append(w.id)
    n_missing_child = note("final work without its chained child", missing_child)
    n_extra_child = note("work with duplicate chained children", extra_child)
    n_wrong_child = note("work with a child of the wrong kind", wrong_child)

    # 3. the effects ledger
    double_exec = note("one attempt executed twice", (cid for (cid, _a), (_n, c) in effects.items() if c > 1))
    no_effect = note(
        "completed without an execution of its attempt",
        (i for i, r in rows.items() if r.status == "completed" and (i, r.attempt) not in effects),
    )
    phantom = note("executions of commands not in the table", (cid for cid, _a in effects if cid not in rows))
    beyond = note(
        "executions of attempts never claimed",
        (cid for cid, a in effects if cid in rows and a > rows[cid].attempt),
    )
    redone: Counter[str] = Counter()  # executions meant to succeed whose success was not the one recorded
    designed_failures = 0
    for (cid, attempt), (name, count) in effects.items():
        row = rows.get(cid)
        if row is None:
            continue
        if name == "work" and raises(row.n, row.fail, attempt):
            designed_failures += count
            continue
        recorded = row.status == "completed" and row.attempt == attempt
        redone[name] += count - (1 if recorded else 0)

    lost = missing + not_final + n_missing_child + no_effect
    double = double_exec + n_extra_child + n_wrong_child
    ghost_total = ghosts + phantom + beyond + strays

    # the report
    by_state = Counter((r.name, r.status, r.outcome) for r in rows.values())
    attempts = Counter(r.attempt for r in works)
    work_fail_lost = sum(1 for r in works if r.status == "failed" and not r.fail)
    always = sum(1 for r in works if r.fail and r.n % commands.ALWAYS_FAIL_EVERY == 0)
    lines = [
        "",
        "=" * 78,
        f"SOAK REPORT  broker={args.broker} workers={args.workers} kill_every={args.kill_every}s "
        f"fail_rate={args.fail_rate} dispatch_timeout={args.dispatch_timeout}s seed={args.seed}",
        "-" * 78,
        f"pushed: {len(committed)} committed work commands ({pushed.with_fail} with fail=True, {always} of them "
        f"always failing), {len(rolled_back)} rolled back; push took {pushed.seconds:.1f}s",
        f"  committed present: {len(committed) - missing}/{len(committed)}   rolled-back present: {ghosts}",
        f"rows in the outbox: {len(rows)}   not final: {not_final}",
        "final states (name, status, outcome): count",
        *(f"  {name:<14} {status:<10} {outcome or '-':<9} {count}" for (name, status, outcome), count in
          sorted(by_state.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or ""))),
        "work attempts (final attempt number: commands): "
        + ", ".join(f"{a}: {c}" for a, c in sorted(attempts.items())),
        f"work with fail=False that ended failed (lost leases used up its retries): {work_fail_lost}",
        "chained children: "
        f"after_work={sum(c for (_p, k), c in children.items() if k == 'after_work')} "
        f"after_failure={sum(c for (_p, k), c in children.items() if k == 'after_failure')}; "
        f"missing={n_missing_child} duplicate={n_extra_child} wrong kind={n_wrong_child}",
        f"effects ledger: {sum(c for _n, c in effects.values())} executions of {len(effects)} attempts; "
        f"{designed_failures} failed by design",
        f"  one attempt executed more than once: {double_exec}",
        f"  completed without an execution of the completed attempt: {no_effect}",
        f"  re-executions (work redone after a kill, at-least-once, allowed): {sum(redone.values())} "
        + str({k: v for k, v in redone.items() if v} or ""),
        f"  executions of commands not in the table: {phantom}; of attempts never claimed: {beyond}",
        f"  unexpected rows (parent / name mismatch): {strays}",
    ]  # fmt: skip
    lines += [
        "-" * 78,
        f"LOST = {lost}  (missing {missing} + not final {not_final} + missing child {n_missing_child} "
        f"+ completed without effect {no_effect})",
        f"DOUBLE-RECORDED = {double}  (attempt executed twice {double_exec} + duplicate children "
        f"{n_extra_child} + wrong-kind children {n_wrong_child})",
        f"GHOSTS = {ghost_total}  (rolled back present {ghosts} + unknown executions {phantom + beyond} "
        f"+ unexpected rows {strays})",
    ]
    return Reconciled(lost, double, ghost_total, lines, offenders)


def log_stats(procs: Iterable[Proc]) -> list[str]:
    """What the workers and beat logged: stale drops, fenced write-backs, lost pool processes, errors."""
    patterns = {
        "stale messages dropped": "not dispatched to this attempt",
        "fenced write-backs": "outcome not recorded",
        "pool processes lost": "WorkerLostError",
        "tracebacks": "Traceback (most recent call last)",
        "database unavailable": "outbox database unavailable",
    }
    counts: Counter[str] = Counter()
    settled = 0
    for proc in procs:
        for line in proc.iter_lines():
            for label, text in patterns.items():
                if text in line:
                    counts[label] += 1
            if "rescuer: settled" in line:
                match = re.search(r"settled (\d+)", line)
                settled += int(match.group(1)) if match else 0
    found = ", ".join(f"{label}={counts[label]}" for label in patterns)
    return [f"logs: {found}, leases settled by rescuer={settled}"]


def evidence(engine: sa.Engine, prefix: str, procs: Iterable[Proc], result: Reconciled) -> list[str]:
    """Rows, effects and log lines of a few offending commands."""
    ids: list[uuid.UUID] = []
    for found in result.offenders.values():
        ids += [i for i in found[:SHOW_OFFENDERS] if i not in ids]
        if len(ids) >= SHOW_OFFENDERS:
            break
    wanted: dict[str, list[str]] = {str(i): [] for i in ids[:SHOW_OFFENDERS]}
    for proc in procs:
        for line in proc.iter_lines():
            for key, matched in wanted.items():
                if key in line and len(matched) < LOG_LINES_PER_OFFENDER:
                    matched.append(f"    {proc.log.name}: {line.rstrip()[:400]}")
    lines = ["", "OFFENDERS"]
    for kind, found in result.offenders.items():
        lines.append(f"  {kind}: {len(found)}: {', '.join(str(i) for i in found[:SHOW_OFFENDERS])}")
    with engine.connect() as conn:
        for key, log_lines in wanted.items():
            row = conn.exec_driver_sql(
                "SELECT id, name, status, outcome, attempt, retries_left, parent_id, worker, error_type, "
                "error_message, created_at, dispatched_at, started_at, finished_at, lease_expires_at, input "
                f"FROM {table(prefix, 'commands')} WHERE id = %(id)s OR parent_id = %(id)s",
                {"id": uuid.UUID(key)},
            ).all()
            eff = conn.exec_driver_sql(
                f"SELECT attempt, name, pid, recorded_at FROM {table(prefix, 'effects')} "
                "WHERE command_id = %(id)s ORDER BY recorded_at",
                {"id": uuid.UUID(key)},
            ).all()
            lines.append(f"  -- {key}")
            lines += [f"    row: {json.dumps(dict(r._mapping), default=str)}" for r in row]
            lines += [f"    effect: {json.dumps(dict(e._mapping), default=str)}" for e in eff]
            lines += log_lines
    return lines
