"""What a test project run by real processes shares: spawning into its folder, reading its outbox
table, and bounded waits that fail early (with the report) when one of its processes dies.

:class:`ProcessProject` is a mixin of ``tests/e2e/harness.Project`` and
``tests/faults/harness.FaultProject``; a subclass provides ``root``, ``procs``, ``store`` (an
``orch_outbox`` Store on the project's table), :meth:`report`, and, for ``wait_drained(relay=True)``,
:meth:`relay_round`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import sqlalchemy as sa

from .procs import Proc, check_alive, clean_env, spawn, tail, wait_ready
from .waiting import wait_until

#: The statuses a command never leaves.
FINAL = ("completed", "failed", "canceled", "expired")


class ProcessProject:
    """Processes, rows and waits of a project folder (a mixin: the subclass holds the state)."""

    #: The default longest wait of this kind of project.
    wait_timeout: ClassVar[float] = 60.0
    #: How often a wait polls.
    poll_interval: ClassVar[float] = 0.1

    root: Path
    procs: list[Proc]
    store: Any

    def report(self) -> str:
        raise NotImplementedError

    def relay_round(self) -> None:
        """One relay and rescue pass made by the test process itself (no beat running)."""
        raise NotImplementedError(f"{type(self).__name__} cannot relay by itself")

    # -- processes ------------------------------------------------------------------------

    def spawn(
        self, role: str, argv: list[str], env: Mapping[str, str] | None = None, ready_text: str | None = None
    ) -> Proc:
        """Start ``argv`` in the project folder (environment: :func:`clean_env` plus ``env``), its output in
        ``<role>-<n>.log`` there; the project stops it at its close."""
        log = self.root / f"{role}-{len(self.procs)}.log"
        proc = spawn(role, argv, self.root, log, env=clean_env(env), ready_text=ready_text)
        self.procs.append(proc)
        return proc

    def wait_ready(self, procs: Iterable[Proc] | None = None) -> None:
        """Wait until every process (default: every one started and expected alive) shows its ready line
        (processes start in parallel, then this)."""
        candidates = self.procs if procs is None else procs
        starting = [p for p in candidates if p.expect_alive and not p.ready()]
        wait_ready(
            starting,
            self.wait_timeout,
            f"{[p.role for p in starting]} to be ready",
            self.poll_interval,
            self.report,
        )

    def logs_report(self, lines: int = 120) -> list[str]:
        """Every process's header and the tail of its log, for failure messages."""
        out = []
        for proc in self.procs:
            out.append(f"--- {proc.describe()} ---")
            out.append(tail(proc.output(), lines))
        return out

    # -- the table ------------------------------------------------------------------------

    def row(self, command_id: uuid.UUID | str) -> dict[str, Any] | None:
        found = self.store.get(command_id if isinstance(command_id, uuid.UUID) else uuid.UUID(command_id))
        return dict(found) if found is not None else None

    def rows(self) -> list[dict[str, Any]]:
        table = self.store.table
        with self.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(table.c.created_at))]

    # -- waiting --------------------------------------------------------------------------

    def wait_for(
        self,
        predicate: Callable[[], Any],
        what: str,
        timeout: float | None = None,
        procs: Iterable[Proc] | None = None,
    ) -> Any:
        """Poll ``predicate`` (bounded); fail at once, with the report, if a watched process (default: every
        one not stopped or killed on purpose) exited; on timeout, fail with the report."""
        watched = list(self.procs if procs is None else procs)

        def check() -> Any:
            check_alive(watched, what, self.report)
            return predicate()

        limit = self.wait_timeout if timeout is None else timeout
        return wait_until(check, limit, self.poll_interval, lambda: f"{what}{self.report()}")

    def wait_status(self, command_id: uuid.UUID | str, *statuses: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait until a command's row is in one of ``statuses``; returns the row."""

        def reached() -> dict[str, Any] | None:
            row = self.row(command_id)
            return row if row is not None and row["status"] in statuses else None

        return self.wait_for(reached, f"command {command_id} to reach {statuses}", timeout)  # type: ignore[no-any-return]

    def wait_drained(
        self, expected_rows: int | None = None, timeout: float | None = None, relay: bool = False
    ) -> list[dict[str, Any]]:
        """Wait until every row is final: exactly ``expected_rows`` of them, or (None) at least one — children
        are inserted with their parent's final state, so the whole tree is done. ``relay``: the test process
        relays and rescues between two looks (no beat running)."""

        def drained() -> list[dict[str, Any]] | None:
            if relay:
                self.relay_round()
            rows = self.rows()
            enough = len(rows) == expected_rows if expected_rows is not None else bool(rows)
            return rows if enough and all(r["status"] in FINAL for r in rows) else None

        what = f"{expected_rows} final rows" if expected_rows is not None else "every command to be final"
        return self.wait_for(drained, what, timeout)  # type: ignore[no-any-return]
