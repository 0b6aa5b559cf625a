"""The ledger every fault scenario ends with: what the outbox table and the side effects must show.

:func:`check_ledger` reads the outbox table and the side-effect table (``<prefix>effects``,
written by the handlers of ``commands.py`` over a connection of their own) and checks,
for the ids a test pushed:

1. **existence** — every committed command exists; no rolled-back command exists; every
   other row is a chained child of an existing row (nothing appeared from nowhere);
2. **finality** — every row is ``completed``, ``failed``, ``canceled`` or ``expired``;
3. **fenced execution** — no attempt of a command ran its handler twice (at most one
   ``start`` and one ``done`` effect per (command, attempt)); a ``completed`` row was
   completed by the attempt it records (its ``done`` effect carries that attempt, and so
   does its output), and exactly one attempt of it reached ``done``: the handler's side
   effect happened once. Commands listed in ``at_least_once`` (a worker was killed after
   the side effect and before its write-back, where the contract promises at-least-once)
   may show more than one ``done``, each from a different attempt. A command that did
   not complete shows no ``done`` at all (unless listed);
4. **chains exactly once** — each parent has exactly the child its final status calls for
   (``commands.CHAINS``: ``then`` for completed, ``if_failed`` for failed,
   ``if_canceled`` for canceled), counted by ``(parent_id, name)``: never twice, never
   the child of another outcome, never a child of an unfinished parent;
5. **row sanity** — completed rows have outcome ``success`` and no error; failed rows an
   error; ``retries_left`` within ``0..retries``; a finished command ran at least one
   attempt unless it was canceled or expired before dispatch.

Every problem found is listed in one AssertionError, with the rows and effects involved.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from .commands import CHAINS

FINAL = ("completed", "failed", "canceled", "expired")


@dataclass
class Ledger:
    """What the ledger read: rows by id and the effects, with small query helpers for extra assertions."""

    rows: dict[uuid.UUID, dict[str, Any]]
    effects: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)

    def row(self, command_id: uuid.UUID | str) -> dict[str, Any]:
        return self.rows[_uuid(command_id)]

    def attempts(self, command_id: uuid.UUID | str, phase: str) -> list[int]:
        """The attempts of a command that recorded ``phase`` (``start`` / ``done``), in order."""
        cid = _uuid(command_id)
        return [e["attempt"] for e in self.effects if e["command_id"] == cid and e["phase"] == phase]

    def children(self, command_id: uuid.UUID | str) -> list[dict[str, Any]]:
        cid = _uuid(command_id)
        return [r for r in self.rows.values() if r["parent_id"] == cid]

    def by_status(self) -> Counter[str]:
        return Counter(r["status"] for r in self.rows.values())


def _uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def read_ledger(engine: sa.Engine, prefix: str) -> Ledger:
    """Read the outbox table and the effects of one project."""
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.exec_driver_sql(f"SELECT * FROM {prefix}commands")]
        effects = [
            dict(r._mapping)
            for r in conn.exec_driver_sql(
                f"SELECT command_id, name, attempt, phase, pid, host_time, db_time FROM {prefix}effects ORDER BY seq"
            )
        ]
    return Ledger({r["id"]: r for r in rows}, effects)


def expected_child(row: dict[str, Any]) -> str | None:
    """The child a finished row's hooks enqueue (``commands.CHAINS``), or None."""
    child = CHAINS.get(row["name"], {}).get(row["status"])
    if child == "after_work" and not (row["input"] or {}).get("chain", True):
        return None
    return child


def check_ledger(
    engine: sa.Engine,
    prefix: str,
    committed: Iterable[uuid.UUID | str],
    rolled_back: Iterable[uuid.UUID | str] = (),
    *,
    at_least_once: Iterable[uuid.UUID | str] = (),
) -> Ledger:
    """Check the ledger of a finished scenario (see the module docstring); returns what it read."""
    ledger = read_ledger(engine, prefix)
    rows = ledger.rows
    problems = ledger.problems
    committed_ids = {_uuid(c) for c in committed}
    rolled_back_ids = {_uuid(c) for c in rolled_back}
    relaxed = {_uuid(c) for c in at_least_once}

    # 1. existence
    for cid in sorted(committed_ids - rows.keys()):
        problems.append(f"committed command {cid} does not exist")
    for cid in sorted(rolled_back_ids & rows.keys()):
        problems.append(f"rolled-back command {cid} exists: {_short(rows[cid])}")
    for cid, row in rows.items():
        if cid not in committed_ids and row["parent_id"] not in rows:
            problems.append(f"row {_short(row)} was neither pushed by the test nor chained from a row")

    # 2. finality
    for row in rows.values():
        if row["status"] not in FINAL:
            problems.append(f"row not final: {_short(row)}")

    # 3. fenced execution, counted on the side effects
    per_attempt = Counter((e["command_id"], e["attempt"], e["phase"]) for e in ledger.effects)
    for (cid, attempt, phase), count in sorted(per_attempt.items(), key=str):
        if count > 1:
            problems.append(f"command {cid} attempt {attempt}: handler recorded {phase!r} {count} times")
    for effect in ledger.effects:
        if effect["command_id"] not in rows:
            problems.append(f"side effect of a command that does not exist: {effect}")
    for cid, row in rows.items():
        done = ledger.attempts(cid, "done")
        if row["status"] == "completed":
            if row["attempt"] not in done:
                problems.append(
                    f"completed by attempt {row['attempt']}, whose handler never reached done: "
                    f"{_short(row)} done={done}"
                )
            if len(done) != 1 and not (cid in relaxed and done):
                problems.append(
                    f"completed command's side effect happened {len(done)} times (attempts {done}): {_short(row)}"
                )
            output = row["output"]
            if row["name"] == "work" and (not isinstance(output, dict) or output.get("attempt") != row["attempt"]):
                problems.append(
                    f"output written by another attempt than the row records: {_short(row)} output={output}"
                )
        elif done and cid not in relaxed:
            problems.append(f"{row['status']} command's handler reached done (attempts {done}): {_short(row)}")

    # 4. chains, exactly once and only for the outcome reached
    children: Counter[tuple[uuid.UUID, str]] = Counter(
        (r["parent_id"], r["name"]) for r in rows.values() if r["parent_id"] is not None
    )
    for cid, row in rows.items():
        want = expected_child(row) if row["status"] in FINAL else None
        got = {name: n for (parent, name), n in children.items() if parent == cid}
        if want is not None and got.get(want) != 1:
            problems.append(f"expected exactly one {want} child, got {got}: {_short(row)}")
        extra = {name: n for name, n in got.items() if name != want}
        if extra:
            problems.append(f"unexpected children {extra} of {_short(row)}")

    # 5. row sanity
    for row in rows.values():
        if not 0 <= row["retries_left"] <= row["retries"]:
            problems.append(f"retries_left out of range: {_short(row)}")
        if row["status"] == "completed" and (row["outcome"] != "success" or row["error_type"] is not None):
            problems.append(f"completed row with outcome {row['outcome']} / error {row['error_type']}: {_short(row)}")
        if row["status"] == "failed" and not row["error_type"]:
            problems.append(f"failed row without an error: {_short(row)}")
        if row["status"] in ("completed", "failed") and row["attempt"] < 1:
            problems.append(f"finished without an attempt: {_short(row)}")

    if problems:
        listing = "\n".join(f"  {_short(r)}" for r in sorted(rows.values(), key=lambda r: str(r["created_at"])))
        effects = "\n".join(
            f"  {e['command_id']} {e['name']} attempt={e['attempt']} {e['phase']} pid={e['pid']}"
            for e in ledger.effects
        )
        raise AssertionError(
            "ledger problems:\n- " + "\n- ".join(problems) + f"\nrows:\n{listing}\neffects:\n{effects}"
        )
    return ledger


def _short(row: dict[str, Any]) -> str:
    return (
        f"{row['id']} {row['name']} {row['status']} attempt={row['attempt']} "
        f"retries_left={row['retries_left']}/{row['retries']} outcome={row['outcome']} "
        f"error={row['error_type']} parent={row['parent_id']}"
    )
