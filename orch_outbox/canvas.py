"""Durable canvases: Celery signatures, chains, groups and chords as outbox rows.

A canvas pushed through the outbox becomes rows now and *steps* for later:

- a signature is one command row;
- ``chain(a, b, c)``: ``a`` is a row; ``b`` and ``c`` are steps stored on that row
  (``chain`` column). When ``a`` completes, the step ``b`` is materialised in the same
  transaction, with ``a``'s output as its first argument (as Celery passes it; an
  immutable ``.si()`` signature takes none), and ``c`` rides on ``b``'s row. A command
  that does not complete ends its chain there, as in Celery;
- ``group([...])`` is a batch: member rows sharing a ``batch_id``;
- ``chord([...], body)`` is a batch whose continuation (``body``) is materialised once,
  when every member is final, with the list of the members' outputs as its first
  argument. If a member did not complete, the body is recorded ``failed`` with a
  ``ChordError`` and does not run (Celery does not call it either).

A step is plain JSON, so it survives in the database across restarts of everything:

- ``{"kind": "call", "name", "target", "input", "retries", "timeout", "priority",
  "delay", "expires", "unique_key", "pass_as", "chain": [steps]}`` (``pass_as``: the
  parameter that receives the previous result, or null);
- ``{"kind": "group", "members": [call steps], "then": call step or null, "chord": bool}``.

This module only shapes data; the store writes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput
from .uuid7 import uuid7

Step = dict[str, Any]
#: The value of ``materialize(value=...)`` when there is no previous result to pass.
NOTHING: Any = object()


@dataclass
class Plan:
    """Rows to insert in one transaction: batches first, then command rows."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rows or self.batches)

    def extend(self, other: Plan) -> None:
        """Add another plan's rows and batches."""
        self.rows.extend(other.rows)
        self.batches.extend(other.batches)

    @classmethod
    def of(cls, rows: Sequence[dict[str, Any]] | Plan) -> Plan:
        """A plan from a list of rows (or the plan itself)."""
        return rows if isinstance(rows, Plan) else cls(rows=list(rows))


def step_from_row(row: dict[str, Any], pass_as: str | None, chain: list[Step] | None = None) -> Step:
    """A call step from a validated row (``Outbox.row_for``); only relative times survive in a step."""
    if row.get("scheduled_at") is not None or row.get("expires_at") is not None:
        raise InvalidInput(
            f"{row['name']}: a chained or continuation step takes relative times only (delay=, expires= seconds)"
        )
    return {
        "kind": "call",
        "name": row["name"],
        "target": row["target"],
        "input": row["input"],
        "retries": row["retries"],
        "timeout": row["timeout"],
        "priority": row["priority"],
        "delay": row.get("delay"),
        "expires": row.get("expires"),
        "unique_key": row.get("unique_key"),
        "pass_as": pass_as,
        "chain": chain or [],
    }


def group_step(members: list[Step], then: Step | None, chord: bool) -> Step:
    """A group step: a batch of ``members``, with ``then`` as its continuation."""
    return {"kind": "group", "members": members, "then": then, "chord": chord}


def row_from_step(
    step: Step, value: Any, parent_id: uuid.UUID | None, tenant: str | None, batch_id: uuid.UUID | None = None
) -> dict[str, Any]:
    """The command row a call step becomes, with ``value`` passed to its ``pass_as`` parameter."""
    data = dict(step["input"])
    if step.get("pass_as") and value is not NOTHING:
        data[step["pass_as"]] = value
    return {
        "id": uuid7(),
        "name": step["name"],
        "target": step["target"],
        "input": data,
        "retries": step["retries"],
        "retries_left": step["retries"],
        "timeout": step["timeout"],
        "priority": step["priority"],
        "parent_id": parent_id,
        "delay": step.get("delay"),
        "expires": step.get("expires"),
        "unique_key": step.get("unique_key"),
        "tenant": tenant,
        "batch_id": batch_id,
        "chain": step.get("chain") or None,
    }


def batch_plan(
    members: Sequence[dict[str, Any]],
    *,
    tenant: str | None,
    continuation: Step | None,
    chord: bool,
    parent_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
) -> Plan:
    """A new batch with these member rows (each gets the batch's id and tenant)."""
    bid = batch_id or uuid7()
    batch = {
        "id": bid,
        "tenant": tenant,
        "kind": "chord" if chord else "batch",
        "status": "open",
        "continuation": continuation,
        "continuation_id": uuid7() if continuation is not None else None,
        "parent_id": parent_id,
    }
    rows = [{**row, "batch_id": bid, "tenant": tenant} for row in members]
    return Plan(rows=rows, batches=[batch])


def materialize(step: Step, value: Any, parent_id: uuid.UUID | None, tenant: str | None) -> Plan:
    """The rows (and batch) a step becomes once the previous result ``value`` is known."""
    if step.get("kind") == "group":
        members = [row_from_step(m, value, parent_id, tenant) for m in step["members"]]
        return batch_plan(
            members, tenant=tenant, continuation=step.get("then"), chord=bool(step.get("chord")), parent_id=parent_id
        )
    if step.get("kind") == "call":
        return Plan(rows=[row_from_step(step, value, parent_id, tenant)])
    raise InvalidInput(f"unknown step kind {step.get('kind')!r}")


def outcome_of(row: Any) -> dict[str, Any]:
    """What a batch continuation receives for one member."""
    error = None
    if row.error_type:
        error = {"type": row.error_type, "message": row.error_message}
    return {"id": str(row.id), "name": row.name, "status": row.status, "output": row.output, "error": error}


def next_in_chain(chain: list[Step], value: Any, parent_id: uuid.UUID | None, tenant: str | None) -> Plan:
    """What a completed command's chain becomes: its next step, carrying the steps after it.

    A group followed by more steps is a chord (as in Celery): its members' outputs, as a
    list, go to the step after it.
    """
    step, rest = chain[0], chain[1:]
    if step.get("kind") == "call":
        return Plan(rows=[row_from_step({**step, "chain": rest}, value, parent_id, tenant)])
    then = step.get("then")
    if then is not None and rest:
        then = {**then, "chain": list(then.get("chain") or []) + rest}
    elif then is None and rest:
        then = {**rest[0], "chain": rest[1:]}
    chord = bool(step.get("chord")) or bool(rest)
    return materialize({**step, "then": then, "chord": chord}, value, parent_id, tenant)
