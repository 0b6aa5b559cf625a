"""Every store statement that changes a command's status makes an allowed change (states.TRANSITIONS).

The statements are read from the store's source: for each ``.values(status=...)`` of an
UPDATE (and each ``{"status": ...}`` handed to the fenced ``_finish``), the states it
writes, and the states its WHERE clause requires (``t.c.status == Status.X``,
``t.c.status.in_(...)``, the running fence ``self._fence``, ``self._p_fence(Status.X)``).
A statement whose expected state cannot be read fails the test: every change must name
the state it expects.
"""

from __future__ import annotations

import ast
from pathlib import Path

from orch_outbox.states import TRANSITIONS, Status

STORE = Path(__file__).resolve().parents[2] / "orch_outbox" / "store"


def _statuses(node: ast.AST) -> set[Status]:
    """``Status.X`` names anywhere under ``node``."""
    return {
        Status[n.attr]
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "Status"
    }


def _is_status_column(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "status" and isinstance(node.value, ast.Attribute)


def _required(node: ast.AST, function: ast.FunctionDef) -> set[Status]:
    """The command states a WHERE argument requires."""
    found: set[Status] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Compare) and _is_status_column(n.left) and isinstance(n.ops[0], ast.Eq):
            found |= _statuses(n.comparators[0])
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            if n.func.attr == "in_" and _is_status_column(n.func.value):
                found |= _statuses(n.args[0])
            elif n.func.attr == "_fence":
                found.add(Status.RUNNING)
            elif n.func.attr in ("_p_fence", "_p_fence_many"):
                found |= _statuses(n.args[0])
        elif isinstance(n, ast.Starred) and isinstance(n.value, ast.Name):
            for assign in ast.walk(function):  # ``fence = (...)`` defined in the same function
                names = [
                    e for t in getattr(assign, "targets", []) for e in (t.elts if isinstance(t, ast.Tuple) else [t])
                ]
                if isinstance(assign, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == n.value.id for t in names
                ):
                    found |= _required(assign.value, function)
    return found


def _chain_wheres(call: ast.Call, function: ast.FunctionDef) -> set[Status]:
    """The states the ``.where(...)`` calls of a statement's method chain require."""
    found: set[Status] = set()
    node: ast.AST = call.func
    while isinstance(node, ast.Attribute):
        node = node.value
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "where":
                for arg in node.args:
                    found |= _required(arg, function)
            node = node.func
    return found


def _changes() -> list[tuple[str, set[Status], set[Status]]]:
    """(where, from states, to states) of every status change in the store's source."""
    changes = []
    for path in sorted(STORE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            finishes = any(
                isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) and c.func.attr == "_finish"
                for c in ast.walk(function)
            )
            for node in ast.walk(function):
                where = f"{path.name}:{getattr(node, 'lineno', 0)} {function.name}"
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "values":
                    status = next((k.value for k in node.keywords if k.arg == "status"), None)
                    if status is not None and _statuses(status):
                        changes.append((where, _chain_wheres(node, function), _statuses(status)))
                elif isinstance(node, ast.Dict) and finishes and function.name != "_finish":
                    for key, value in zip(node.keys, node.values, strict=True):
                        if isinstance(key, ast.Constant) and key.value == "status":
                            changes.append((where, {Status.RUNNING}, _statuses(value)))
    return changes


def test_every_status_change_of_the_store_is_an_allowed_transition() -> None:
    """Proves each UPDATE that writes a status names the states it expects, and each (from, to) pair it
    allows is in TRANSITIONS (writing the same state back is allowed: nothing changes)."""
    changes = _changes()
    assert len(changes) >= 19, changes  # the scan found the store's statements (not a vacuous pass)
    unknown = [where for where, before, _ in changes if not before]
    assert unknown == [], f"status changes that do not name the state they expect: {unknown}"
    wrong = [
        (where, sorted(before), sorted(after))
        for where, before, after in changes
        if any(b != a and a not in TRANSITIONS[b] for b in before for a in after)
    ]
    assert wrong == []


def test_final_states_are_never_left_but_by_an_operator() -> None:
    """Proves the lifecycle's table: completed, canceled and expired are final; a failed command leaves only to
    pending (an operator's re-queue); every state is reachable from pending."""
    assert all(not TRANSITIONS[s] for s in (Status.COMPLETED, Status.CANCELED, Status.EXPIRED))
    assert TRANSITIONS[Status.FAILED] == {Status.PENDING}
    reached, frontier = {Status.PENDING}, [Status.PENDING]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    assert reached == set(Status)
