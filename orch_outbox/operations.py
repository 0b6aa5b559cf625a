"""Reading and operating commands: get, cancel (and Celery's revoke), batches, pause, dead letters, retention."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

from . import control
from .errors import (
    BatchNotFound,
    CommandNotFound,
    InvalidOption,
)
from .models import AttemptInfo, BatchInfo, CommandInfo, _batch_info
from .parts import OutboxParts
from .schema import BATCH_STATUSES, FINAL_STATUSES, STATUSES
from .task import Outcome
from .validation import (
    _as_uuid,
    _check_page,
    _scope,
    _selection,
    _tenant,
)

log = logging.getLogger("orch_outbox")


class Operations(OutboxParts):
    """Reading and operating commands: get, cancel (and Celery's revoke), batches, pause, dead letters, retention."""

    def get(self, command_id: uuid.UUID | str) -> CommandInfo:
        """A command's state, output, error and attempts; raises CommandNotFound."""
        row = self.store.get(_as_uuid(command_id))
        if row is None:
            raise CommandNotFound(f"no command with id {command_id}")
        return CommandInfo.from_row(row)

    def attempts(self, command_id: uuid.UUID | str) -> list[AttemptInfo]:
        """Every attempt of a command, oldest first: those that failed (the history) and its current one."""
        info = self.get(command_id)
        history = {r["attempt"]: AttemptInfo.from_row(r) for r in self.store.attempt_history(info.id)}
        if info.attempt and info.attempt not in history and info.status not in ("pending", "dispatched"):
            history[info.attempt] = AttemptInfo(
                info.attempt, info.worker, info.started_at, info.finished_at, info.outcome, info.error
            )
        return [history[n] for n in sorted(history)]

    def children(self, command_id: uuid.UUID | str) -> list[CommandInfo]:
        """The commands chained from one command."""
        return [CommandInfo.from_row(r) for r in self.store.children(_as_uuid(command_id))]

    def cancel(self, command_id: uuid.UUID | str) -> bool:
        """Cancel a command that is not final; returns False when it already was.

        Pending or dispatched: ``canceled`` at once, its on-cancel commands enqueued in
        the same transaction. Running: the cancellation is recorded and the workers are
        told (a broadcast); the handler is interrupted with :class:`CommandCanceled`
        (threads and solo pools: in its thread; prefork: by signal) or learns it at its
        next ``current().heartbeat()``; its worker then records ``canceled`` and the
        on-cancel commands. A handler that returns before it learns it is ``completed``.
        """
        return self._cancel(_as_uuid(command_id)) is not None

    def _cancel(self, cid: uuid.UUID) -> str | None:
        """Cancel one command; the status it had, or None if it was final (or is unknown)."""
        names: list[str] = []

        def children_for(name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
            names.append(name)
            try:
                return self.chained_rows(name, "if_canceled", Outcome(cid, name, data))
            except Exception:  # as in settle.py: a raising hook costs its commands, never the cancellation
                log.exception("if_canceled hook of %s raised; canceling %s without its commands", name, cid)
                return []

        was = self.store.cancel(cid, children_for)
        if was is None:
            return None
        status, attempt = was
        if status != "running":
            self.telemetry.count("canceled", name=names[0] if names else "")
        if status == "running":
            self.tell_workers_to_cancel(f"{cid}:{attempt}")
        else:  # final now, and no worker request will say so: the result backend learns it here
            self.results.revoked(cid, names[0] if names else "", "canceled")
        return status

    def revoke(self, task_ids: Iterable[str]) -> tuple[set[str], set[str]]:
        """Celery's revoke of these task ids, for the ones that are commands (see ``control.py``).

        Returns (the ids that are commands of this outbox, the ones canceled before they ran).
        """
        commands: set[str] = set()
        before_run: set[str] = set()
        for task_id in task_ids:
            try:
                cid = uuid.UUID(str(task_id))
            except ValueError:
                continue
            status = self._cancel(cid)
            if status is None and self.store.get(cid) is None:
                continue
            commands.add(task_id)
            if status in ("pending", "dispatched"):
                before_run.add(task_id)
        return commands, before_run

    def tell_workers_to_cancel(self, task_id: str) -> None:
        """Broadcast a cancel of one running attempt; a failure is logged (heartbeats still tell the handler)."""
        try:
            self.app.control.broadcast(control.CANCEL_CONTROL, arguments={"task_id": task_id})
        except Exception as exc:  # the request is in the database; the broadcast only makes it prompt
            log.warning("could not broadcast the cancellation of %s: %s", task_id, exc)

    def batch(self, batch_id: uuid.UUID | str) -> BatchInfo:
        """A batch's state and its members' counts by state; raises :class:`BatchNotFound`."""
        row = self.store.batch_stats(_as_uuid(batch_id, BatchNotFound))
        if row is None:
            raise BatchNotFound(f"no batch with id {batch_id}")
        return _batch_info(row)

    def batches(
        self, *, tenant: str | None = None, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[BatchInfo]:
        """Batches, newest first, with their progress."""
        _check_page(limit, offset)
        if status is not None and status not in BATCH_STATUSES:
            raise InvalidOption(f"batch status must be one of {BATCH_STATUSES}, got {status!r}")
        rows = self.store.list_batches(tenant, status, limit, offset)
        return [_batch_info(self.store.batch_stats(r["id"]) or r) for r in rows]

    def batch_members(self, batch_id: uuid.UUID | str, limit: int = 1000, offset: int = 0) -> list[CommandInfo]:
        """A batch's members, newest first."""
        _check_page(limit, offset)
        bid = _as_uuid(batch_id, BatchNotFound)
        if self.store.batch_stats(bid) is None:
            raise BatchNotFound(f"no batch with id {batch_id}")
        rows = self.store.find(limit=limit, offset=offset, batch_id=bid)
        return [CommandInfo.from_row(r) for r in rows]

    def cancel_batch(self, batch_id: uuid.UUID | str) -> int:
        """Cancel a batch: pending members now, running ones told to stop; its continuation never runs.

        Returns how many members were canceled or asked to stop (0 if the batch was final).
        """
        bid = _as_uuid(batch_id, BatchNotFound)

        def children_for(cid: uuid.UUID, name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
            return self.chained_rows(name, "if_canceled", Outcome(cid, name, data))

        _, canceled, running = self.store.cancel_batch(bid, children_for)
        for command_id, attempt in running:
            self.tell_workers_to_cancel(f"{command_id}:{attempt}")
        return canceled + len(running)

    def tenant_stats(self, tenant: str) -> dict[str, Any]:
        """A tenant's commands and batches counted by state, and the mean run time of its completed commands."""
        return dict(self.store.tenant_stats(_tenant(tenant) or ""))

    def pause(self, *, target: str | None = None, tenant: str | None = None) -> bool:
        """Hold back every command, one target's, or one tenant's; False if that pause was in force.

        Paused commands stay pending; running ones finish. A message already in the
        broker goes back to pending when a worker receives it, unstarted: once this
        returns, no command of that scope starts until :meth:`resume`.
        """
        return self.store.pause(*_scope(target, tenant))

    def resume(self, *, target: str | None = None, tenant: str | None = None) -> bool:
        """Lift a pause made with the same arguments; False if there was none."""
        return self.store.resume(*_scope(target, tenant))

    def paused(self) -> list[dict[str, Any]]:
        """The pauses in force: ``{"scope": "all"|"target"|"tenant", "value", "paused_at"}``."""
        return [dict(r) for r in self.store.paused()]

    def find(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        target: str | None = None,
        tenant: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[CommandInfo]:
        """Commands matching the filters, newest first (``status="failed"``: the dead letters)."""
        _check_page(limit, offset)
        if status is not None and status not in STATUSES:
            raise InvalidOption(f"status must be one of {STATUSES}, got {status!r}")
        rows = self.store.find(limit, offset, status=status, name=name, target=target, tenant=tenant)
        return [CommandInfo.from_row(r) for r in rows]

    def count(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        target: str | None = None,
        tenant: str | None = None,
    ) -> int:
        """How many commands match the filters of :meth:`find` (a listing's total)."""
        if status is not None and status not in STATUSES:
            raise InvalidOption(f"status must be one of {STATUSES}, got {status!r}")
        return self.store.count(status=status, name=name, target=target, tenant=tenant)

    def failed(self, **filters: Any) -> list[CommandInfo]:
        """Failed commands (the dead letters) with their errors, newest first; filters as :meth:`find`."""
        return self.find(status="failed", **filters)

    def requeue(
        self,
        ids: Iterable[uuid.UUID | str] | None = None,
        *,
        name: str | None = None,
        target: str | None = None,
        tenant: str | None = None,
        all: bool = False,
    ) -> int:
        """Put failed commands back to pending, due now, with fresh retries; returns how many.

        Name ids, or filters, or ``all=True``; nothing at all is refused (so a typo
        cannot re-queue every dead letter).
        """
        id_list = _selection("requeue", ids, name, target, tenant, all)
        return self.store.requeue(ids=id_list, name=name, target=target, tenant=tenant)

    def purge(
        self,
        ids: Iterable[uuid.UUID | str] | None = None,
        *,
        status: str = "failed",
        name: str | None = None,
        target: str | None = None,
        tenant: str | None = None,
        all: bool = False,
    ) -> int:
        """Delete final commands (failed by default); returns how many. Needs ids, a filter or ``all=True``.

        Members of a batch that is still open are kept: its continuation will read them.
        """
        id_list = _selection("purge", ids, name, target, tenant, all)
        if status not in FINAL_STATUSES:
            raise InvalidOption(f"only final commands can be purged: status must be one of {FINAL_STATUSES}")
        return self.store.purge(status=status, ids=id_list, name=name, target=target, tenant=tenant)

    def bulk(self, action: str, ids: Iterable[uuid.UUID | str]) -> int:
        """One action on many commands: ``cancel``, ``requeue`` (failed ones), ``purge`` (final ones), ``run_now``
        (pending ones due later); returns how many changed. Rows in another state are left as they are."""
        id_list = [_as_uuid(i) for i in ids]
        if action not in BULK_ACTIONS:
            raise InvalidOption(f"action must be one of {BULK_ACTIONS}, got {action!r}")
        if not id_list:
            return 0
        if action == "cancel":
            return sum(1 for i in id_list if self._cancel(i) is not None)
        if action == "requeue":
            return self.store.requeue(ids=id_list)
        if action == "run_now":
            return self.store.run_now(id_list)
        by_status: dict[str, list[uuid.UUID]] = {}
        for row in self.store.find(len(id_list), 0, ids=id_list):
            if row["status"] in FINAL_STATUSES:
                by_status.setdefault(row["status"], []).append(row["id"])
        return sum(self.store.purge(status=status, ids=group) for status, group in by_status.items())


#: What :meth:`Operations.bulk` can do.
BULK_ACTIONS = ("cancel", "requeue", "purge", "run_now")
