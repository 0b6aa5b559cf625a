"""Worker remote control: Celery's ``revoke`` cancels commands through the outbox.

``celery control revoke <id>``, ``AsyncResult(id).revoke()`` and Flower's Revoke and
Terminate buttons send Celery's ``revoke`` broadcast. For an id that is a command of an
outbox attached to the worker's app, the worker cancels it exactly as ``outbox.cancel``
does (pending or dispatched: ``canceled`` at once with its ``if_canceled`` commands;
running: its handler is interrupted and the attempt ends ``canceled``) and announces
``task-revoked`` for the ones it canceled before they ran. ``terminate`` is not needed
and not used for commands: killing a pool process can hit the next task it took. Every
other id goes to Celery's own revoke unchanged. Each worker that receives the broadcast
tries; the first one cancels, the others find the command final.

``orch_outbox_cancel`` is the outbox's own broadcast: it interrupts a running attempt
(``"<id>:<attempt>"``, or any attempt of ``"<id>"``) in the process that runs it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.utils.functional import maybe_list
from celery.worker.control import Panel, control_command, ok

from .running import RUNNING

log = logging.getLogger("orch_outbox.control")

#: The name of the outbox's interrupt broadcast.
CANCEL_CONTROL = "orch_outbox_cancel"

#: Celery's own revoke, for the ids that are not commands.
CELERY_REVOKE: Callable[..., Any] = Panel.data["revoke"]

#: Per app: ``revoke(ids) -> (ids that are commands, ids canceled before they ran)``.
REVOKERS: weakref.WeakKeyDictionary[Celery, Callable[[list[str]], tuple[set[str], set[str]]]] = (
    weakref.WeakKeyDictionary()
)


@control_command(args=[("task_id", str)], signature="<task_id>")  # type: ignore[untyped-decorator]
def orch_outbox_cancel(state: Any, task_id: str) -> dict[str, str]:
    """Worker remote control: interrupt a running attempt (``Outbox.cancel`` broadcasts it)."""
    if RUNNING.interrupt(task_id):
        return {"ok": f"interrupted {task_id}"}
    return {"ok": f"{task_id} is not running in this process"}


@control_command(name="revoke", variadic="task_id", signature="[id1 [id2 [... [idN]]]]")  # type: ignore[untyped-decorator]
def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any) -> Any:
    """Revoke tasks by id; ids of outbox commands are canceled through the outbox (see the module docstring)."""
    ids = {str(i) for i in (maybe_list(task_id) or [])}
    consumer = getattr(state, "consumer", None)
    app = getattr(consumer, "app", None)
    revoker = REVOKERS.get(app) if app is not None else None
    commands: set[str] = set()
    if revoker is not None and ids:
        try:
            commands, before_run = revoker(sorted(ids))
        except Exception as exc:  # the database is away: nothing canceled; the caller can revoke again
            log.warning("revoke: could not cancel %s through the outbox: %s", sorted(ids), exc)
            commands, before_run = set(), set()
        dispatcher = getattr(consumer, "event_dispatcher", None)
        for command_id in sorted(before_run):
            if dispatcher is not None:
                dispatcher.send("task-revoked", uuid=command_id, terminated=False, signum=None, expired=False)
    others = sorted(ids - commands)
    if others:
        reply = CELERY_REVOKE(state, others, terminate, signal, **kwargs)
        if not commands:
            return reply
    return ok(f"tasks {sorted(ids)} flagged as revoked (commands {sorted(commands)} canceled through the outbox)")
