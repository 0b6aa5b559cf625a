"""What the rooms of the Outbox (pushing, operations, scheduling, wiring) may use of one another.

:class:`~orch_outbox.outbox.Outbox` is the union of those rooms; each room is a class of
its own file that reaches the others only through the names declared here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uuid

    import sqlalchemy as sa
    from celery import Celery
    from celery.canvas import Signature

    from . import backoff as backoff_mod
    from .executor import Executor
    from .jobs import JobRunner
    from .reaper import Reaper
    from .relay import Relay
    from .rescuer import Rescuer
    from .results import Results
    from .settings import Settings
    from .settle import Settler
    from .store import ErrorInfo, Store
    from .task import Outcome
    from .telemetry import Telemetry
    from .workers import Presence


class OutboxParts:
    """The shared surface of the Outbox's rooms (declarations only; the Outbox provides them)."""

    app: Celery
    presence: Presence | None
    runner: JobRunner | None

    if TYPE_CHECKING:

        @property
        def settings(self) -> Settings: ...

        @property
        def engine(self) -> sa.Engine: ...

        @property
        def store(self) -> Store: ...

        @property
        def backoff(self) -> backoff_mod.Backoff: ...

        @property
        def results(self) -> Results: ...

        @property
        def telemetry(self) -> Telemetry: ...

        @property
        def settler(self) -> Settler: ...

        @property
        def executor(self) -> Executor: ...

        @property
        def relay(self) -> Relay: ...

        @property
        def reads(self) -> OutboxParts: ...

        @property
        def rescuer(self) -> Rescuer: ...

        @property
        def reaper(self) -> Reaper: ...

        def relay_once(self) -> int: ...

        def rescue_once(self) -> int: ...

        def cleanup_once(self, budget: float = 5.0) -> int: ...

        def tick_schedules(self) -> list[dict[str, Any]]: ...

        def revoke(self, task_ids: Iterable[str]) -> tuple[set[str], set[str]]: ...

        def report_failure(
            self, command_id: uuid.UUID, name: str, attempt: int, outcome: str, error: ErrorInfo, *, final: bool
        ) -> None: ...

        def row_for(
            self, call: Signature, parent_id: uuid.UUID | None = None, leading_result: bool = False
        ) -> dict[str, Any]: ...

        def chained_rows(self, name: str, kind: str, outcome: Outcome) -> list[dict[str, Any]]: ...
